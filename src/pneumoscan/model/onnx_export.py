"""ONNX export of a bundle (uint8 grey images in; logits, pooled features and the last feature map out)
and int8 quantisation. Export needs PyTorch (the ``train`` extra); quantisation needs ONNX Runtime alone.

The exported graph holds the network alone, normalisation included. Temperature and threshold stay in
the bundle's config (and are copied into the ONNX metadata for readers of the file alone), so a
recalibrated bundle keeps its ONNX models and one export serves every calibration of the weights."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from pneumoscan.core.errors import ConfigError
from pneumoscan.io.fileio import atomic_write
from pneumoscan.model.bundle import Bundle, onnx_metadata, with_metadata, write_bundle
from pneumoscan.model.schema import ONNX, ONNX_FEATURE_MAP, ONNX_FEATURES, ONNX_INPUT, ONNX_INT8, ONNX_OUTPUT, WEIGHTS


def export_onnx(bundle: Bundle, out: str | Path | None = None) -> Path:
    """Write the whole network, normalisation included, as ONNX (opset 17, dynamic batch): input
    ``image`` uint8 ``(N, 1, S, S)``, outputs ``logit`` ``(N,)``, ``features`` ``(N, F)`` and
    ``feature_map`` ``(N, F, h, w)``. Without ``out`` it goes into the bundle, recorded by sha256 in its config."""
    from pneumoscan.core.errors import require_train_extra

    carries = "" if bundle.onnx_path() else " (it carries no ONNX model: export it once where PyTorch is installed)"
    require_train_extra(f"exporting {bundle.path} to ONNX{carries}", ("torch", "timm", "torchvision"))
    if bundle.head_only:
        return export_head_only(bundle, out)
    from pneumoscan.model.networks import WithFeatures, export_graph

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        export_graph(
            WithFeatures(bundle.load_net()), bundle.image_size, raw, [ONNX_OUTPUT, ONNX_FEATURES, ONNX_FEATURE_MAP]
        )
        return _deliver(bundle, raw, ONNX, out)


def export_head_only(bundle: Bundle, out: str | Path | None = None, precision: str = "int8") -> Path:
    """A head-only bundle's ONNX model: its pinned backbone's features graph (MatMul weights int8 by
    default, what the head was fitted on; ``precision="fp32"`` for checking) followed by the head.
    Outputs ``logit`` and ``features``; a ViT has no convolutional ``feature_map`` for Grad-CAM."""
    from pneumoscan.model.frozen_graphs import backbone_graph, with_head

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


def _float_nodes(model_path: Path) -> list[str]:
    """The nodes that stay in float. The input's normalisation and the stem convolution (every node up to
    and including the first Conv): quantising the stem's input to 8 bits costs most of the int8 error on
    films, for a few percent of the time. The dense head and the outputs: tiny, and the logit needs precision."""
    import onnx

    graph = onnx.load(str(model_path)).graph
    first_conv = next((i for i, n in enumerate(graph.node) if n.op_type == "Conv"), -1)
    stem = [n.name for n in graph.node[: first_conv + 1]]
    return stem + [n.name for n in graph.node if n.op_type in ("Gemm", "MatMul")]
