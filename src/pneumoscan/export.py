"""ONNX export of a bundle (uint8 grey images in; logit and calibrated probability out) and int8 quantisation."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .bundle import ONNX, ONNX_INT8, Bundle


class _Exported(nn.Module):
    def __init__(self, net: nn.Module, temperature: float):
        super().__init__()
        self.net = net
        self.temperature = float(temperature)

    def forward(self, image: torch.Tensor):
        logit = self.net(image)
        return logit, torch.sigmoid(logit / self.temperature)


def export_onnx(bundle: Bundle, out: str | Path | None = None) -> Path:
    """Write the whole model, normalisation and sigmoid included, as ONNX (opset 17, dynamic batch).

    Input ``image``: uint8 ``(N, 1, S, S)``; outputs ``logit`` and ``probability`` ``(N,)``."""
    out = Path(out) if out else bundle.path / ONNX
    model = _Exported(bundle.load_net(), bundle.temperature).eval()
    example = torch.zeros((1, 1, bundle.image_size, bundle.image_size), dtype=torch.uint8)
    tmp = out.with_name(f".{out.name}.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode(), warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of torch.export, but it handles this model
        # without extra dependencies and its output is tested for parity; silence the notice.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            dynamo=False,
            opset_version=17,
            input_names=["image"],
            output_names=["logit", "probability"],
            dynamic_axes={"image": {0: "batch"}, "logit": {0: "batch"}, "probability": {0: "batch"}},
        )
    os.replace(tmp, out)
    return out


def quantize_int8(
    bundle: Bundle, fp32_model: Path, images: np.ndarray, out: str | Path | None = None, method: str = "MinMax"
) -> Path:
    """Static int8 quantisation (QDQ, per-channel weights) calibrated on ``images`` (uint8 (N,S,S)),
    which must come from training data, never from the test split. ``method``: ONNX Runtime's
    activation-range calibration, MinMax, Percentile or Entropy."""
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
            return None if batch is None else {"image": np.ascontiguousarray(batch)}

    out = Path(out) if out else bundle.path / ONNX_INT8
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_model), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=_head_nodes(prepared),
            calibrate_method=getattr(CalibrationMethod, method),
        )
    return out


def training_images(bundle: Bundle, root: str | Path | None, count: int = 256, seed: int = 0) -> np.ndarray:
    """Prepared images from the train split that calibrate int8 (default: the bundle's own training data)."""
    from .data import load_images, load_split, stratified_subset
    from .errors import ConfigError

    root = root or bundle.config.get("training", {}).get("data")
    if not root or not Path(root).is_dir():
        raise ConfigError("int8 calibration needs training images: pass --calibration-data ROOT (with ROOT/train)")
    samples = stratified_subset(load_split(root, "train"), count // 2, seed)
    return load_images(samples, bundle.image_size, progress=False)[0]


def _head_nodes(model_path: Path) -> list[str]:
    """The dense head and the output nodes stay in float: they are tiny and the logit needs precision."""
    import onnx

    graph = onnx.load(str(model_path)).graph
    return [n.name for n in graph.node if n.op_type in ("Gemm", "MatMul", "Sigmoid", "Div")]
