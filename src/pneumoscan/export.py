"""ONNX export of a bundle (uint8 grey images in; logits, pooled features and the last feature map out)
and int8 quantisation. Export needs PyTorch (the ``train`` extra); quantisation needs ONNX Runtime alone.

The exported graph holds the network alone, normalisation included. Temperature and threshold stay in
the bundle's config (and are copied into the ONNX metadata for readers of the file alone), so a
recalibrated bundle keeps its ONNX models and one export serves every calibration of the weights."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np

from .bundle import (
    ONNX,
    ONNX_FEATURE_MAP,
    ONNX_FEATURES,
    ONNX_INPUT,
    ONNX_INT8,
    ONNX_OUTPUT,
    WEIGHTS,
    Bundle,
    atomic_write,
    onnx_metadata,
    with_metadata,
    write_bundle,
)
from .errors import ConfigError
from .options import ExportOptions
from .settings import DECLARED, declared


def export_onnx(bundle: Bundle, out: str | Path | None = None) -> Path:
    """Write the whole network, normalisation included, as ONNX (opset 17, dynamic batch): input
    ``image`` uint8 ``(N, 1, S, S)``, outputs ``logit`` ``(N,)``, ``features`` ``(N, F)`` and
    ``feature_map`` ``(N, F, h, w)``. Without ``out`` it goes into the bundle, recorded by sha256 in its config."""
    from .errors import require_train_extra

    carries = "" if bundle.onnx_path() else " (it carries no ONNX model: export it once where PyTorch is installed)"
    require_train_extra(f"exporting {bundle.path} to ONNX{carries}", ("torch", "timm", "torchvision"))
    if bundle.head_only:
        return export_head_only(bundle, out)
    import torch

    from .models import WithFeatures

    net = WithFeatures(bundle.load_net()).eval()
    example = torch.zeros((1, 1, bundle.image_size, bundle.image_size), dtype=torch.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.inference_mode(), warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of torch.export, but it handles this model
            # without extra dependencies and its output is tested for parity; silence the notice.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                net,
                (example,),
                str(raw),
                dynamo=False,
                opset_version=17,
                input_names=[ONNX_INPUT],
                output_names=[ONNX_OUTPUT, ONNX_FEATURES, ONNX_FEATURE_MAP],
                dynamic_axes={n: {0: "batch"} for n in (ONNX_INPUT, ONNX_OUTPUT, ONNX_FEATURES, ONNX_FEATURE_MAP)},
            )
        return _deliver(bundle, raw, ONNX, out)


def export_head_only(bundle: Bundle, out: str | Path | None = None, precision: str = "int8") -> Path:
    """A head-only bundle's ONNX model: its pinned backbone's features graph (MatMul weights int8 by
    default, what the head was fitted on; ``precision="fp32"`` for checking) followed by the head.
    Outputs ``logit`` and ``features``; a ViT has no convolutional ``feature_map`` for Grad-CAM."""
    from .frozen_onnx import backbone_graph, with_head

    bundle.check_pinned_backbone()
    head = bundle.head_weights()
    if head is None:
        raise ConfigError(f"{bundle.path}: the weights hold no dense head")
    graph = backbone_graph(bundle.config["backbone"], bundle.image_size, precision)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model.onnx"
        model.write_bytes(with_head(graph, head))
        return _deliver(bundle, model, ONNX, out)


def _deliver(bundle: Bundle, model: Path, name: str, out: str | Path | None) -> Path:
    """An exported model, with the bundle's metadata, into the bundle as ``name`` (through the one bundle
    writer: sha256 recorded) or, given ``out``, into that file alone."""
    data = with_metadata(model, onnx_metadata(bundle.config))
    if out is not None:
        atomic_write(Path(out), data)
        return Path(out)
    updated = write_bundle(
        bundle.path, bundle.config, bundle.metrics, weights=bundle.path / WEIGHTS, files={name: data}
    )
    bundle.config = updated.config
    return bundle.path / name


def quantize_int8(
    bundle: Bundle, fp32_model: Path, images: np.ndarray, out: str | Path | None = None, method: str = "MinMax"
) -> Path:
    """Static int8 quantisation (QDQ, per-channel weights) calibrated on ``images`` (uint8 (N,S,S)),
    which must come from training data, never from the test split. ``method``: ONNX Runtime's
    activation-range calibration, MinMax, Percentile or Entropy."""
    if bundle.head_only:
        raise ConfigError(
            f"{bundle.path}: a head-only bundle's model.onnx already holds its backbone with int8 MatMul weights "
            "(the graph its head was fitted on); no static int8 model is made for it"
        )
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([images[i : i + 16][:, None] for i in range(0, len(images), 16)])

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {ONNX_INPUT: np.ascontiguousarray(batch)}

    with tempfile.TemporaryDirectory() as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32_model), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(quantized),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=_float_nodes(prepared),
            calibrate_method=getattr(CalibrationMethod, method),
            extra_options={"CalibMovingAverage": True},
        )
        return _deliver(bundle, quantized, ONNX_INT8, out)


def training_images(bundle: Bundle, root: str | Path | None, count: int = 1024, seed: int = 0) -> np.ndarray:
    """Prepared images that calibrate int8: from the patients the bundle was trained on (its recipe's split
    of ``root``, default its own training data), never from its validation patients or the test split."""
    from .data import load_images, stratified_subset

    root = root or bundle.config.get("training", {}).get("data")
    if not root or not Path(root).is_dir():
        raise ConfigError("int8 calibration needs training images: pass --calibration-data ROOT (with ROOT/train)")
    train, _ = bundle.training_splits(root)
    samples = stratified_subset(train, count // 2, seed)
    return load_images(samples, bundle.preprocessing, progress=False)[0]


def _float_nodes(model_path: Path) -> list[str]:
    """The nodes that stay in float. The input's normalisation and the stem convolution (every node up to
    and including the first Conv): quantising the stem's input to 8 bits costs most of the int8 error on
    films, for a few percent of the time. The dense head and the outputs: tiny, and the logit needs precision."""
    import onnx

    graph = onnx.load(str(model_path)).graph
    first_conv = next((i for i, n in enumerate(graph.node) if n.op_type == "Conv"), -1)
    stem = [n.name for n in graph.node[: first_conv + 1]]
    return stem + [n.name for n in graph.node if n.op_type in ("Gemm", "MatMul")]


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
    from .bundle import load_bundle
    from .errors import require_train_extra
    from .output import ensure_folder
    from .text import printable

    require_train_extra("pneumoscan export", ("torch", "timm", "torchvision"))
    bundle = load_bundle(model)
    if not out and bundle.path.resolve().is_relative_to(Path(__file__).parent.resolve()):
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
    :mod:`pneumoscan.quantization`); the input gate's int8 feature limit is refitted first, on the same
    images its other limits were set on. Returns the record."""
    from .data import load_images
    from .feature_heads import HEADS
    from .gate import calibration_images
    from .inference import OnnxEngine
    from .quantization import agreement

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
