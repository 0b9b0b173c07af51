"""``pneumoscan heads fit``: give an existing bundle its feature heads (the input gate, the bacterial/viral
head), fitted exactly as ``train`` fits them.

For bundles trained before a head existed. The images are the bundle's own training images and
validation patients (carved from train by patient with its recipe's seed and fraction); the test split
is not opened. The fitting is training's (``training.fit_gate`` and ``training.fit_subtype`` on the
PyTorch network), so a bundle gets the same heads either way; where the bundle has an int8 ONNX model,
the gate's feature limit for it is fitted on its own features of the same validation X-rays. The
weights and the pneumonia head are untouched; the new files' sha256 go into config.json and the model
card is regenerated (``bundle.write_bundle``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bundle import GATE, SUBTYPE, WEIGHTS, Bundle, load_bundle, write_bundle
from .data import load_images
from .errors import TRAINING_STACK, require_train_extra
from .options import HeadsFitOptions
from .settings import DECLARED, declared


@dataclass
class _Fitting:
    """What fitting a head reads: the bundle, its network, and its training and validation images."""

    bundle: Bundle
    net: object
    seed: int
    train_images: np.ndarray
    train: list
    val_images: np.ndarray
    val: list


def _fit_gate(f: _Fitting) -> tuple[dict, dict, list[str]]:
    """The input gate: its file, no metrics, and what was fitted."""
    from .inference import OnnxEngine
    from .training import fit_gate, gate_images

    gate, lines = fit_gate(f.net, f.train_images, f.val_images, f.seed), []
    if (int8 := f.bundle.onnx_path(int8=True)) is not None:  # the int8 model's own feature limit
        engine = OnnxEngine(int8, f.bundle)
        calibration = gate_images(f.train_images, f.val_images, f.seed)[1]
        features = np.concatenate([engine.run(calibration[i : i + 64])[1] for i in range(0, len(calibration), 64)])
        gate.fit_int8_limit(features)
        lines.append(f"gate: int8 feature limit {gate.int8_limit:.2f} (fp32 {gate.feature_limit:.2f})")
    lines.append(
        f"gate: limits: features {gate.feature_limit:.2f}, statistics {gate.statistics_limit:.2f}, "
        f"orientation {gate.orientation_limit:.2f}"
    )
    return {GATE: gate.to_bytes()}, {}, lines


def _fit_subtype(f: _Fitting) -> tuple[dict, dict, list[str]]:
    """The bacterial/viral head: its file and validation report, or nothing where no name tells a subtype."""
    from .training import fit_subtype

    if not (fitted := fit_subtype(f.net, f.train_images, f.train, f.val_images, f.val)):
        return {}, {}, ["subtype head: not fitted (no subtype in the training or validation file names)"]
    head, report = fitted
    line = f"subtype head: validation AUC {report['auc']:.3f}, temperature {head.temperature:.3f}"
    return {SUBTYPE: head.to_bytes()}, {"subtype": report}, [line]


FITTERS = {"gate": _fit_gate, "subtype": _fit_subtype}  # the names --only takes (options.HeadsFitOptions)


@declared(HeadsFitOptions, "model", "data", "only", "progress")
def fit_heads(
    model: str | Path, data: str | Path, *, only: str | None = DECLARED, progress: bool = DECLARED
) -> tuple[Bundle, list[str]]:
    """Fit the heads (``only``: just ``gate`` or ``subtype``) onto the bundle at ``model`` from the training
    data at ``data``; returns the rewritten bundle and one line per head fitted."""
    require_train_extra("pneumoscan heads fit", TRAINING_STACK)
    from tqdm import tqdm

    bundle = load_bundle(model)
    train, val = bundle.training_splits(data)
    train_images, train, _ = load_images(train, bundle.image_size, progress, "loading train")
    val_images, val, _ = load_images(val, bundle.image_size, progress, "loading validation")
    seed = bundle.config.get("training", {}).get("recipe", {}).get("seed", 0)
    fitting = _Fitting(bundle, bundle.load_net(), seed, train_images, train, val_images, val)
    files, validation, lines = {}, dict(bundle.metrics.get("validation", {})), []
    names = [only] if only else list(FITTERS)
    for name in tqdm(names, desc="fitting heads", unit="head", disable=not progress):
        head_files, head_metrics, head_lines = FITTERS[name](fitting)
        files.update(head_files)
        validation.update(head_metrics)
        lines += head_lines
    metrics = {**bundle.metrics, "validation": validation}
    written = write_bundle(bundle.path, bundle.config, metrics, weights=bundle.path / WEIGHTS, files=files)
    return written, lines
