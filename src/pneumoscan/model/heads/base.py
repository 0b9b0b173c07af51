"""The feature head interface: a small model on the pooled features every engine returns beside the logit.

A head (:class:`FeatureHead`) is fitted on a trained network's features of training and validation images
(:class:`FitData`), written into the bundle as one safetensors file (``filename``; its sha256 goes into
config.json like every file that can change an answer), loaded back, and applied to each batch that is
predicted (:class:`Batch`), giving result fields (``fields``, in the prediction record's order). It may
also report on labelled images in ``evaluate`` (its block of metrics.json and report lines).

The heads there are, and their order, are declared once in :data:`pneumoscan.model.heads.registry.HEADS`; the
bundle, training, ``heads fit``, inference, the output record, the service's fields and evaluation read
them from there. This module is light (numpy only): the registry, the bundle schema and the output record
import it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from pneumoscan.core.errors import ConfigError

if TYPE_CHECKING:  # the interface stays below the image layer
    from pneumoscan.io.images import Preprocessing

MAX_HEAD_BYTES = 64 * 2**20  # the largest head file a bundle may hold, unless a head says otherwise
ERROR = "error"  # the result field through which a head refuses an input (the input gate)


@dataclass(frozen=True)
class ResultField:
    """One field a head adds to the prediction record (:data:`pneumoscan.inference.result.FIELDS`)."""

    name: str
    label: str  # how people read it (the service's page, GET /v1/fields)
    digits: int | None = None  # decimals a number is written with; None: written as it is
    csv: bool = True  # also a CSV column (predict --format csv, an evaluation's predictions.csv)


def signed_root(features: np.ndarray) -> np.ndarray:
    """Signed square root: the plain root for a CNN's non-negative pooled features (heavy-tailed; the root
    evens out their variances), and sign-preserving for a ViT's signed token features."""
    features = np.asarray(features, dtype=np.float64)
    return np.sign(features) * np.sqrt(np.abs(features))


@dataclass
class FitData:
    """What fitting a head reads: the training and validation samples (validation: patients carved from
    train), their prepared images, and the network's pooled features of them.

    Features come from ``features_of`` (prepared uint8 images ``(N, S, S)`` -> ``(N, F)``), or, where a
    frozen backbone's features were cached for every sample (``train --frozen-features``), from
    ``train_features`` / ``val_features``; images not held in memory are decoded on demand."""

    seed: int
    preprocessing: int | Preprocessing  # how the images are prepared (a size: the canonical preprocessing)
    train_samples: list
    val_samples: list
    features_of: Callable[[np.ndarray], np.ndarray]
    train_images: np.ndarray | None = None
    val_images: np.ndarray | None = None
    train_features: np.ndarray | None = None
    val_features: np.ndarray | None = None
    int8_features_of: Callable[[np.ndarray], np.ndarray] | None = None  # heads fit: the bundle's int8 ONNX model

    @property
    def cached(self) -> bool:
        """Every sample's features were computed already (each new image costs a backbone pass)."""
        return self.train_features is not None and self.val_features is not None

    def samples(self, split: str) -> list:
        return self.train_samples if split == "train" else self.val_samples

    def images(self, split: str, rows=None) -> np.ndarray:
        """Prepared images of ``split`` ("train" or "val"), all or ``rows`` of them."""
        held = self.train_images if split == "train" else self.val_images
        if held is not None:
            return np.asarray(held if rows is None else held[rows])
        from pneumoscan.io.dataset import load_images

        samples = self.samples(split)
        chosen = samples if rows is None else [samples[i] for i in rows]
        return load_images(chosen, self.preprocessing, progress=False)[0]

    def features(self, split: str, rows=None) -> np.ndarray:
        """Pooled features of ``split``'s images, all or ``rows`` of them (cached, or computed)."""
        cached = self.train_features if split == "train" else self.val_features
        if cached is not None:
            return cached if rows is None else cached[rows]
        return self.features_of(self.images(split, rows))


@dataclass
class Fitted:
    """A fitted head (None: nothing to fit it on), its validation report (stored in metrics.json under
    the head's name; None: none) and lines saying what was fitted."""

    head: FeatureHead | None
    report: dict | None = None
    lines: list[str] = field(default_factory=list)


@dataclass
class Batch:
    """What applying heads reads: one batch of prepared images ``(N, S, S)``, the engine's pooled features
    ``(N, F)``, calibrated probabilities and labels, the engine the features come from (torch, onnx,
    onnx-int8), each input's colourfulness before it became grey, and whether refusals are applied."""

    images: np.ndarray
    features: np.ndarray
    probabilities: np.ndarray
    labels: list[str]
    engine: str = "onnx"
    chroma: list[float] | None = None
    gating: bool = True


@dataclass
class Evaluation:
    """What a head's report on labelled images reads: the samples, their pooled features, the results
    predicted for them with refusals off (None where none were made), and the bootstrap settings."""

    samples: list
    features: np.ndarray
    results: list | None
    n_resamples: int
    seed: int
    split: str


class FeatureHead:
    """The interface every feature head implements (``gate.Gate``, ``subtype.SubtypeHead``)."""

    name: ClassVar[str]  # its key in HEADS, in metrics.json and for ``heads fit --only``
    filename: ClassVar[str]  # its file in the bundle
    fields: ClassVar[tuple[ResultField, ...]] = ()  # the result fields it adds, in record order
    max_bytes: ClassVar[int] = MAX_HEAD_BYTES
    description: ClassVar[str] = ""  # what it is, in a few words (``heads fit`` help)

    @classmethod
    def fit(cls, data: FitData) -> Fitted:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        """The head as a safetensors file's bytes (never pickle)."""
        raise NotImplementedError

    @classmethod
    def load(cls, path: Path, n_features: int | None = None) -> FeatureHead:
        """The head from its file, or a ConfigError saying in one line why it cannot be one."""
        raise NotImplementedError

    def apply(self, batch: Batch) -> list[dict]:
        """One dict of result fields per image of the batch (empty: nothing to add). A field named
        :data:`ERROR` refuses the input when ``batch.gating``: its result then holds only this head's fields."""
        raise NotImplementedError

    def evaluate(self, data: Evaluation) -> dict | None:
        """Its report on labelled images (metrics.json under its name), or None."""
        return None

    @classmethod
    def report_lines(cls, report: dict, n: int) -> list[str]:
        """Its report in the console summary of ``evaluate`` (``n``: the images evaluated)."""
        return []

    @classmethod
    def figures(cls, report: dict, folder: Path) -> dict[str, Path]:
        """Figures of its report (title -> PNG file) for report.html."""
        return {}


def read_safetensors(path: Path, what: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A head file's arrays (float64) and metadata, or one line saying it is not readable as ``what``."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "numpy") as f:
            metadata = f.metadata() or {}
            arrays = {key: f.get_tensor(key).astype(np.float64) for key in f.keys()}
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"{path}: not a readable {what} ({type(exc).__name__})") from None
    return arrays, metadata
