"""Distillation: a student trained on a teacher bundle's probabilities as well as on the labels.

``pneumoscan train --teacher BUNDLE [--teacher-weight A]`` minimises, per training image,

    (1 - A) * w[y] * BCE(y, student)  +  A * BCE(p_teacher, student)

where ``w`` are the class weights of ``--class-weights`` (the label term is today's loss) and
``p_teacher`` is the teacher's calibrated probability of PNEUMONIA. ``--label-smoothing`` pulls both
targets towards 0.5 by the same amount. The teacher term is not class-weighted: a teacher trained with
balanced weights has its class balance in its probabilities already.

The teacher is any bundle (one network or an ensemble): its probabilities come from the public
:class:`pneumoscan.inference.classifier.Classifier` with the input gate off, once per training image, on the
un-augmented file prepared by the teacher itself at the teacher's image size (the student may use
another size or backbone). They are cached under ``$PNEUMOSCAN_CACHE/teacher`` like frozen features
(:mod:`pneumoscan.training.features`), keyed by the digest of the teacher's ``config.json`` (which pins its
weights' sha256, every file it uses and its temperature) and per image by path, size and mtime.
Augmentation never changes an image's target.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumoscan.core.errors import ConfigError
from pneumoscan.io.dataset import Sample
from pneumoscan.model.backbones import sha256_file
from pneumoscan.model.bundle import Bundle
from pneumoscan.model.schema import CONFIG
from pneumoscan.model.store import load_bundle

DEFAULT_WEIGHT = 0.5  # A when --teacher-weight is not given
CHECKPOINT = 1024  # images between stores written (a long run stopped keeps what it did)


def balanced_class_weights(labels, mode: str = "balanced") -> tuple[float, float]:
    """(NORMAL, PNEUMONIA) loss weights: ``n / (2 n_class)`` for ``balanced``, 1 and 1 for ``none``."""
    if mode == "none":
        return 1.0, 1.0
    labels = np.asarray(labels)
    n, pos = len(labels), int(labels.sum())
    return n / (2 * max(n - pos, 1)), n / (2 * max(pos, 1))


def distillation_loss(
    logits, labels, class_weights, teacher=None, teacher_weight: float = DEFAULT_WEIGHT, label_smoothing: float = 0.0
):
    """``(1 - A) * mean(w[y] * BCE(y, logits)) + A * mean(BCE(teacher, logits))`` (torch tensors; both
    targets pulled towards 0.5 by ``label_smoothing``); without a teacher, the label term alone."""
    import torch.nn.functional as F

    def smooth(target):
        return target * (1 - label_smoothing) + 0.5 * label_smoothing

    weights = class_weights[labels.long()]
    label_term = (F.binary_cross_entropy_with_logits(logits, smooth(labels), reduction="none") * weights).mean()
    if teacher is None:
        return label_term
    teacher_term = F.binary_cross_entropy_with_logits(logits, smooth(teacher.to(logits.dtype)))
    return (1 - teacher_weight) * label_term + teacher_weight * teacher_term


def soft_rows(x: np.ndarray, y: np.ndarray, class_weights, teacher: np.ndarray | None, teacher_weight: float):
    """The same loss for a weighted-sample fitter (logistic regression): ``(X, Y, sample_weight)`` where each
    image is one row with its label weighted ``(1 - A) w[y]``, and, with a teacher, a PNEUMONIA row weighted
    ``A p`` and a NORMAL row weighted ``A (1 - p)``: the weighted log loss of these rows is exactly the
    distillation loss (times the number of images)."""
    w = np.asarray(class_weights, dtype=np.float64)[y]
    if teacher is None:
        return x, y, w
    p = np.asarray(teacher, dtype=np.float64)
    xs = np.concatenate([x, x, x])
    ys = np.concatenate([y, np.ones_like(y), np.zeros_like(y)])
    ws = np.concatenate([(1 - teacher_weight) * w, teacher_weight * p, teacher_weight * (1 - p)])
    keep = ws > 0  # sklearn refuses no zero weights, but they only cost time
    return xs[keep], ys[keep], ws[keep]


@dataclass
class Teacher:
    """A teacher bundle, verified, with the digest that names its cached probabilities."""

    bundle: Bundle
    digest: str  # sha256 of its config.json
    weight: float = DEFAULT_WEIGHT

    @classmethod
    def load(cls, path: str | Path, weight: float | None = None) -> Teacher:
        """The bundle at ``path`` (verified like any bundle); a path that is not one is a one-line error."""
        try:
            bundle = load_bundle(path)
        except ConfigError as exc:
            raise ConfigError(f"--teacher {exc}") from None
        return cls(bundle, sha256_file(bundle.path / CONFIG), DEFAULT_WEIGHT if weight is None else weight)

    def record(self) -> dict:
        """What a student's bundle records about its teacher."""
        return {
            "path": str(self.bundle.path.resolve()),
            "name": self.bundle.name,
            "weights_sha256": self.bundle.config.get("weights_sha256"),
            "config_sha256": self.digest,
            "weight": self.weight,
        }

    def probabilities(
        self, samples: list[Sample], progress: bool = True, cache: Path | None = None
    ) -> tuple[np.ndarray, list[Sample], list[str]]:
        """``(calibrated probabilities (N,), kept samples, errors)``: the teacher's probability of PNEUMONIA
        for each image, from the cache where it was computed before; unreadable images are left out."""
        from pneumoscan.training.features import RowCache

        store = RowCache(cache or teacher_cache(), f"teacher-{self.digest[:16]}-", 1)
        x, kept, errors = store.rows(samples, lambda missing: self._compute(missing, progress, store))
        return x[:, 0].astype(np.float32), kept, errors

    def _compute(self, samples: list[Sample], progress: bool, store) -> None:
        from tqdm import tqdm

        from pneumoscan.inference.classifier import Classifier
        from pneumoscan.training.features import image_key

        with warnings.catch_warnings():  # "no input gate": the gate is off here anyway
            warnings.simplefilter("ignore")
            classifier = Classifier(self.bundle, int8=False, gate=False)
        bar = tqdm(total=len(samples), desc=f"teacher {self.bundle.name}", unit="img", disable=not progress)
        for part in range(0, len(samples), CHECKPOINT):
            chunk = samples[part : part + CHECKPOINT]
            probabilities, keys, errors = [], [], {}
            for batch in classifier.iter_predictions([s.path for s in chunk], total=len(chunk)):
                bar.update(len(batch))
                for sample, result in zip(chunk[len(keys) + len(errors) :], batch):
                    if result.ok:
                        keys.append(image_key(sample.path))
                        probabilities.append([result.probability])
                    else:
                        errors[image_key(sample.path)] = f"{sample.path}: {result.error}"
            matrix = [np.asarray(probabilities, np.float32).reshape(-1, 1)]
            store.write(matrix, keys, errors)
        bar.close()


def teacher_cache() -> Path:
    """``$PNEUMOSCAN_CACHE/teacher``, else ``~/.cache/pneumoscan/teacher``."""
    from pneumoscan.training.features import cache_root

    return cache_root().parent / "teacher"


def aligned(probabilities: np.ndarray, scored: list[Sample], wanted: list[Sample]) -> np.ndarray:
    """The teacher probabilities of ``wanted`` (a subset of ``scored``, e.g. the images that decoded)."""
    by_path = {s.path: float(p) for s, p in zip(scored, probabilities)}
    return np.asarray([by_path[s.path] for s in wanted], np.float32)
