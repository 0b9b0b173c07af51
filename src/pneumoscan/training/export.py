"""`pneumoscan export`: a bundle's ONNX models written into it (or beside it), int8 measured against fp32 on
validation films."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from pneumoscan.core.errors import ConfigError
from pneumoscan.core.options import ExportOptions
from pneumoscan.core.package import PACKAGE
from pneumoscan.core.settings import DECLARED, declared
from pneumoscan.model.bundle import Bundle, write_bundle
from pneumoscan.model.onnx_export import export_onnx, quantize_int8
from pneumoscan.model.schema import ONNX, ONNX_INT8, WEIGHTS


def training_images(bundle: Bundle, root: str | Path | None, count: int = 1024, seed: int = 0) -> np.ndarray:
    """Prepared images that calibrate int8: from the patients the bundle was trained on (its recipe's split
    of ``root``, default its own training data), never from its validation patients or the test split."""
    from pneumoscan.io.dataset import load_images, stratified_subset

    root = root or bundle.config.get("training", {}).get("data")
    if not root or not Path(root).is_dir():
        raise ConfigError("int8 calibration needs training images: pass --calibration-data ROOT (with ROOT/train)")
    train, _ = bundle.training_splits(root)
    samples = stratified_subset(train, count // 2, seed)
    return load_images(samples, bundle.preprocessing, progress=False)[0]


@declared(ExportOptions, "model", "out", "int8", "int8_only", "calibration_data", "calibration_images")
def export_bundle(
    model: str | Path | None = DECLARED,
    out: str | Path | None = DECLARED,
    *,
    int8: bool = DECLARED,
    int8_only: bool = DECLARED,
    calibration_data: str | Path | None = DECLARED,
    calibration_images: int = DECLARED,
) -> list[tuple[str, Path]]:
    """``pneumoscan export``: the bundle's network as ONNX fp32 (and int8 with ``int8``), into the bundle
    (recorded by sha256 in its config, where predict uses it) or to ``out``; returns ``(kind, path)`` per
    file written."""
    from pneumoscan.core.errors import require_train_extra
    from pneumoscan.core.text import printable
    from pneumoscan.io.fileio import ensure_folder
    from pneumoscan.model.store import load_bundle

    require_train_extra("pneumoscan export", ("torch", "timm", "torchvision"))
    bundle = load_bundle(model)
    if not out and bundle.path.resolve().is_relative_to(PACKAGE):
        raise ConfigError(
            f"{bundle.name} is a model shipped inside the package, whose files are not rewritten: "
            "pass --out FILE.onnx, or --model BUNDLE for a bundle of your own"
        )
    if out and Path(out).resolve().parent == bundle.path.resolve():
        if Path(out).name != ONNX:  # a file of its own name in the bundle would never be used
            raise ConfigError(
                f"{printable(out)}: inside the bundle only {ONNX} is used (and {ONNX_INT8} with --int8); "
                "leave out --out to export into the bundle"
            )
        out = None  # the bundle's own model.onnx: written and recorded as without --out
    if out:
        if Path(out).is_dir():
            raise ConfigError(f"{printable(out)}: --out names a folder; give a FILE.onnx")
        ensure_folder(Path(out).parent)
    if int8_only and (out or not int8):
        raise ConfigError("--int8-only goes with --int8 and without --out")
    images = training_images(bundle, calibration_data, calibration_images) if int8 else None
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(bundle, Path(tmp) / "fp32.onnx" if int8_only else out)
        if not int8_only:
            written.append(("fp32", fp32))
        if images is not None:
            written.append(
                ("int8", quantize_int8(bundle, fp32, images, Path(out).with_suffix(".int8.onnx") if out else None))
            )
            if not out:
                record_int8_agreement(bundle, fp32, calibration_data)
    return written


def record_int8_agreement(bundle: Bundle, fp32_model: Path, root: str | Path | None = None) -> dict:
    """Measure the bundle's int8 model against ``fp32_model`` on the bundle's validation films (its
    recipe's split of ``root``, default its training data) and record it in config.json (``int8``, see
    :mod:`pneumoscan.model.quantization`); the input gate's int8 feature limit is refitted first, on the same
    images its other limits were set on. Returns the record."""
    from pneumoscan.inference.engines import OnnxEngine
    from pneumoscan.io.dataset import load_images
    from pneumoscan.model.heads.gate import calibration_images
    from pneumoscan.model.heads.registry import HEADS
    from pneumoscan.model.quantization import agreement

    root = root or bundle.config.get("training", {}).get("data")
    _, validation = bundle.training_splits(root)
    images = load_images(validation, bundle.preprocessing, progress=False)[0]
    fp32, int8 = OnnxEngine(fp32_model, bundle, name="onnx"), OnnxEngine(bundle.onnx_path(int8=True), bundle)
    gate, files = bundle.load_gate(), {}
    if gate is not None:
        seed = bundle.config.get("training", {}).get("recipe", {}).get("seed", 0)
        gate.fit_int8_limit(_run(int8, calibration_images(images, seed))[1])
        files[HEADS["gate"].filename] = gate.to_bytes()
    (logits32, features32), (logits8, features8) = _run(fp32, images), _run(int8, images)
    refused = [
        None if gate is None else np.array([not v.accepted for v in gate.check(images, features, engine.name)])
        for features, engine in ((features32, fp32), (features8, int8))
    ]
    measured = agreement(
        bundle.probabilities(logits32),
        bundle.probabilities(logits8),
        bundle.threshold,
        np.array([s.label for s in validation]),
        *refused,
    )
    record = {"sha256": bundle.config["files"][ONNX_INT8], "source": f"validation patients of {Path(root).name}"}
    record.update(measured)
    updated = write_bundle(
        bundle.path, {**bundle.config, "int8": record}, bundle.metrics, weights=bundle.path / WEIGHTS, files=files
    )
    bundle.config = updated.config
    return record


def _run(engine, images: np.ndarray, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    outputs = [engine.run(images[i : i + batch]) for i in range(0, len(images), batch)]
    return np.concatenate([o[0] for o in outputs]), np.concatenate([o[1] for o in outputs])
