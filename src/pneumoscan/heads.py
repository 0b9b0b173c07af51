"""``pneumoscan heads fit``: give an existing bundle its feature heads (every head in
:data:`pneumoscan.feature_heads.HEADS`: the input gate, the bacterial/viral head), fitted exactly as
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

from pathlib import Path

from .bundle import WEIGHTS, Bundle, load_bundle, write_bundle
from .data import load_images
from .errors import TRAINING_STACK, require_train_extra
from .feature_head import FitData
from .feature_heads import HEADS, fit_heads_on
from .options import HeadsFitOptions
from .settings import DECLARED, declared

FITTERS = HEADS  # the names --only takes (options.HeadsFitOptions): every registered head


@declared(HeadsFitOptions, "model", "data", "only", "progress")
def fit_heads(
    model: str | Path, data: str | Path, *, only: str | None = DECLARED, progress: bool = DECLARED
) -> tuple[Bundle, list[str]]:
    """Fit the heads (``only``: just that one) onto the bundle at ``model`` from the training data at
    ``data``; returns the rewritten bundle and the lines saying what was fitted."""
    require_train_extra("pneumoscan heads fit", TRAINING_STACK)
    from .models import predict_outputs

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
        bundle=bundle,
    )
    files, reports, lines = fit_heads_on(fitting, [only] if only else None, progress)
    metrics = {**bundle.metrics, "validation": {**bundle.metrics.get("validation", {}), **reports}}
    written = write_bundle(bundle.path, bundle.config, metrics, weights=bundle.path / WEIGHTS, files=files)
    return written, lines
