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

from pathlib import Path

import numpy as np

from .bundle import GATE, SUBTYPE, WEIGHTS, Bundle, load_bundle, write_bundle
from .data import load_images
from .errors import TRAINING_STACK, require_train_extra
from .options import HeadsFitOptions
from .settings import DECLARED, declared


@declared(HeadsFitOptions, "model", "data", "only", "progress")
def fit_heads(
    model: str | Path, data: str | Path, *, only: str | None = DECLARED, progress: bool = DECLARED
) -> tuple[Bundle, list[str]]:
    """Fit the heads (``only``: just ``gate`` or ``subtype``) onto the bundle at ``model`` from the training
    data at ``data``; returns the rewritten bundle and one line per head fitted."""
    require_train_extra("pneumoscan heads fit", TRAINING_STACK)
    from .inference import OnnxEngine
    from .training import fit_gate, fit_subtype, gate_images

    bundle = load_bundle(model)
    net = bundle.load_net()
    seed = bundle.config.get("training", {}).get("recipe", {}).get("seed", 0)
    train, val = bundle.training_splits(data)
    train_images, train, _ = load_images(train, bundle.image_size, progress, "loading train")
    val_images, val, _ = load_images(val, bundle.image_size, progress, "loading validation")
    files, metrics, lines = {}, bundle.metrics, []
    if only in (None, "gate"):
        gate = fit_gate(net, train_images, val_images, seed)
        if (int8 := bundle.onnx_path(int8=True)) is not None:
            engine = OnnxEngine(int8, bundle)
            calibration = gate_images(train_images, val_images, seed)[1]
            features = np.concatenate([engine.run(calibration[i : i + 64])[1] for i in range(0, len(calibration), 64)])
            gate.fit_int8_limit(features)
            lines.append(f"gate: int8 feature limit {gate.int8_limit:.2f} (fp32 {gate.feature_limit:.2f})")
        files[GATE] = gate.to_bytes()
        lines.append(
            f"gate: limits: features {gate.feature_limit:.2f}, statistics {gate.statistics_limit:.2f}, "
            f"orientation {gate.orientation_limit:.2f}"
        )
    if only in (None, "subtype"):
        if fitted := fit_subtype(net, train_images, train, val_images, val):
            head, report = fitted
            files[SUBTYPE] = head.to_bytes()
            metrics = {**metrics, "validation": {**metrics.get("validation", {}), "subtype": report}}
            lines.append(f"subtype head: validation AUC {report['auc']:.3f}, temperature {head.temperature:.3f}")
        else:
            lines.append("subtype head: not fitted (no subtype in the training or validation file names)")
    written = write_bundle(bundle.path, bundle.config, metrics, weights=bundle.path / WEIGHTS, files=files)
    return written, lines
