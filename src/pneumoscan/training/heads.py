"""``pneumoscan heads fit``: give an existing bundle its feature heads (every head in
:data:`pneumoscan.model.heads.registry.HEADS`: the input gate, the bacterial/viral head), fitted exactly as
``train`` fits them.

For bundles trained before a head existed. The images are the bundle's own training images and
validation patients (carved from train by patient with its recipe's seed and fraction); the test split
is not opened. The fitting is training's (each head's ``from_training`` on the PyTorch network's
features), so a bundle gets the same heads either way; where the bundle has an int8 ONNX model, the
gate's feature limit for it is fitted on its own features of the same validation X-rays. The weights and
the pneumonia head are untouched; the new files' sha256 go into config.json and the model card is
regenerated (``bundle.write_bundle``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumoscan.core.errors import TRAINING_STACK, require_train_extra
from pneumoscan.core.options import quiet_option
from pneumoscan.core.settings import DECLARED, declared, option
from pneumoscan.io.dataset import load_images
from pneumoscan.model.bundle import Bundle, write_bundle
from pneumoscan.model.heads.base import FitData
from pneumoscan.model.heads.registry import HEADS
from pneumoscan.model.schema import WEIGHTS
from pneumoscan.model.store import load_bundle

FITTERS = HEADS  # the names --only takes: every registered head


@dataclass
class HeadsFitOptions:
    model: str = option(help="the bundle folder to give its heads", positional=True, path=True, metavar="BUNDLE")
    data: str = option(
        help="the bundle's training data root (its train split; the test split is not opened)",
        path=True,
        metavar="ROOT",
    )
    only: str | None = option(None, "fit only this head (every one when not given)", choices=tuple(FITTERS))
    progress: bool = quiet_option()


@declared(HeadsFitOptions, "model", "data", "only", "progress")
def fit_heads(
    model: str | Path, data: str | Path, *, only: str | None = DECLARED, progress: bool = DECLARED
) -> tuple[Bundle, list[str]]:
    """Fit the heads (``only``: just that one) onto the bundle at ``model`` from the training data at
    ``data``; returns the rewritten bundle and the lines saying what was fitted."""
    require_train_extra("pneumoscan heads fit", TRAINING_STACK)
    from pneumoscan.model.networks import predict_outputs

    bundle = load_bundle(model)
    train, val = bundle.training_splits(data)
    train_images, train, _ = load_images(train, bundle.preprocessing, progress, "loading train")
    val_images, val, _ = load_images(val, bundle.preprocessing, progress, "loading validation")
    seed = bundle.config.get("training", {}).get("recipe", {}).get("seed", 0)
    net = bundle.load_net()
    fitting = FitData(
        seed,
        bundle.preprocessing,
        train,
        val,
        lambda images: predict_outputs(net, images)[1],
        train_images=train_images,
        val_images=val_images,
        int8_features_of=int8_features_of(bundle),
    )
    files, reports, lines = fit_heads_on(fitting, [only] if only else None, progress)
    metrics = {**bundle.metrics, "validation": {**bundle.metrics.get("validation", {}), **reports}}
    written = write_bundle(bundle.path, bundle.config, metrics, weights=bundle.path / WEIGHTS, files=files)
    return written, lines


def int8_features_of(bundle: Bundle):
    """The pooled features of the bundle's own int8 ONNX model, where it has one apart from its fp32 model
    (the gate fits its int8 limit on them), else None."""
    int8 = bundle.onnx_path(int8=True)
    if int8 in (None, bundle.onnx_path()):
        return None
    from pneumoscan.inference.engines import OnnxEngine

    engine = OnnxEngine(int8, bundle)
    return lambda images: np.concatenate([engine.run(images[i : i + 64])[1] for i in range(0, len(images), 64)])


def fit_heads_on(data: FitData, names: list[str] | None = None, progress: bool = False) -> tuple[dict, dict, list]:
    """Fit the heads named (default: all, in HEADS order) on ``data``: their files (name -> bytes, for
    the bundle), their validation reports (head name -> report, for metrics.json) and what was fitted,
    one line or more per head."""
    from tqdm import tqdm

    files, reports, lines = {}, {}, []
    for name in tqdm(names or list(HEADS), desc="fitting heads", unit="head", disable=not progress):
        fitted = HEADS[name].from_training(data)
        if fitted.head is not None:
            files[HEADS[name].filename] = fitted.head.to_bytes()
        if fitted.report is not None:
            reports[name] = fitted.report
        lines += fitted.lines
    return files, reports, lines
