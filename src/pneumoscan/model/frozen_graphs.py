"""A frozen backbone as an ONNX graph: what a head-only bundle ships and what its head is fitted on.

A bundle trained on frozen features of a large backbone (DINOv2 ViT-S/14: 22 M parameters, 88 MB in
float32) stores only its head; the backbone is pinned by its registry name and the sha256 of its
pretrained weights. What predicts on a torch-free install is the bundle's ONNX model: the backbone's
features graph with its MatMul weights quantised to int8 (dynamic quantisation: int8 weights, activations
quantised at run time, each image on its own; 23 MB, 2.4x faster than float32 on a CPU), followed by the
head in float32. Because the int8 graph is what ships, the head is fitted on the features of that graph (cached
by the graph's sha256 like any frozen features), not on the float32 network's.

Graphs are made once per (backbone, weights sha256, image size) and kept under
``$PNEUMOSCAN_CACHE/onnx/``; making them needs PyTorch (the ``train`` extra), using them does not.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from pneumoscan.model.backbones import sha256_file
from pneumoscan.model.schema import ONNX_FEATURES, ONNX_INPUT, ONNX_OUTPUT

FP32, INT8 = "fp32", "int8"
QUANTIZATION = "int8-dynamic-matmul"  # what "int8" means here (recorded in the bundle's config)


def graph_root() -> Path:
    """``$PNEUMOSCAN_CACHE/onnx``, else ``~/.cache/pneumoscan/onnx``."""
    return Path(os.environ.get("PNEUMOSCAN_CACHE", Path.home() / ".cache" / "pneumoscan")) / "onnx"


def backbone_graph(backbone: str, image_size: int = 224, precision: str = INT8, cache: Path | None = None) -> Path:
    """The features graph of ``backbone`` with the registry's pretrained weights: input ``image`` uint8
    ``(N, 1, S, S)``, output ``features`` float32 ``(N, F)``. ``precision``: ``int8`` (MatMul weights
    int8, dynamic) or ``fp32``. Made once and cached; an existing file is reused as it is."""
    from pneumoscan.model.backbones import weights_digest

    if precision not in (FP32, INT8):
        raise ValueError(f"precision must be {FP32} or {INT8}, not {precision!r}")
    root = cache or graph_root()
    path = root / f"{backbone}-{image_size}-{weights_digest(backbone, 'imagenet')[:16]}-{precision}.onnx"
    if path.is_file():
        return path
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        made = Path(tmp) / path.name
        if precision == FP32:
            _export_fp32(backbone, image_size, made)
        else:
            _quantize(backbone_graph(backbone, image_size, FP32, cache), made)
        os.replace(made, path)
    return path


def _export_fp32(backbone: str, image_size: int, out: Path) -> None:
    from torch import nn

    from pneumoscan.model.networks import create_model, export_graph

    class Features(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net.features(x)

    export_graph(
        Features(create_model(backbone, weights="imagenet", image_size=image_size)), image_size, out, [ONNX_FEATURES]
    )


def _quantize(fp32: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        batched = Path(tmp) / "batched.onnx"
        quantize_dynamic(str(fp32), str(batched), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
        out.write_bytes(_one_image_at_a_time(batched))


def _one_image_at_a_time(path: Path) -> bytes:
    """The graph wrapped in a Scan over the batch. Dynamic quantisation scales each activation tensor by its
    range over the whole batch, so without this an image's features (and probability) would depend on the
    images sharing its batch; inside the Scan each image is quantised on its own, whatever the batch."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    size = [d.dim_value for d in g.input[0].type.tensor_type.shape.dim][2:]
    width = g.output[0].type.tensor_type.shape.dim[1].dim_value
    rename = {ONNX_INPUT: "scan.image4d", ONNX_FEATURES: "scan.features2d"}
    nodes = []
    for node in g.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
        node.output[:] = [rename.get(n, n) for n in node.output]
        nodes.append(node)
    axis = numpy_helper.from_array(np.array([0], np.int64), "scan.axis0")
    body = helper.make_graph(
        [
            helper.make_node("Unsqueeze", ["scan.image", "scan.axis0"], ["scan.image4d"]),
            *nodes,
            helper.make_node("Squeeze", ["scan.features2d", "scan.axis0"], ["scan.features"]),
        ],
        "one_image",
        [helper.make_tensor_value_info("scan.image", TensorProto.UINT8, [1, *size])],
        [helper.make_tensor_value_info("scan.features", TensorProto.FLOAT, [width])],
        initializer=[*g.initializer, axis],
    )
    scan = helper.make_node("Scan", [ONNX_INPUT], [ONNX_FEATURES], num_scan_inputs=1, body=body)
    graph = helper.make_graph(
        [scan],
        g.name,
        [helper.make_tensor_value_info(ONNX_INPUT, TensorProto.UINT8, ["batch", 1, *size])],
        [helper.make_tensor_value_info(ONNX_FEATURES, TensorProto.FLOAT, ["batch", width])],
    )
    wrapped = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="pneumoscan")
    wrapped.ir_version = model.ir_version
    onnx.checker.check_model(wrapped)
    return wrapped.SerializeToString()


def with_head(graph: Path, head: dict[str, np.ndarray]) -> bytes:
    """The features graph followed by the dense head (``w1`` (H, F), ``b1``, ``w2`` (1, H), ``b2``, as
    :meth:`Bundle.head_weights` reads them): outputs ``logit`` (N,) and ``features`` (N, F)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(graph))
    g = model.graph
    names = {"w1": "head.0.weight", "b1": "head.0.bias", "w2": "head.3.weight", "b2": "head.3.bias"}
    g.initializer.extend(numpy_helper.from_array(np.asarray(head[k], np.float32), names[k]) for k in names)
    g.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), "head.logit_shape"))
    g.node.extend(
        [
            helper.make_node("Gemm", [ONNX_FEATURES, names["w1"], names["b1"]], ["head.hidden"], transB=1),
            helper.make_node("Relu", ["head.hidden"], ["head.relu"]),
            helper.make_node("Gemm", ["head.relu", names["w2"], names["b2"]], ["head.out"], transB=1),
            helper.make_node("Reshape", ["head.out", "head.logit_shape"], [ONNX_OUTPUT]),
        ]
    )
    features = next(o for o in g.output if o.name == ONNX_FEATURES)
    del g.output[:]
    g.output.extend([helper.make_tensor_value_info(ONNX_OUTPUT, onnx.TensorProto.FLOAT, ["batch"]), features])
    onnx.checker.check_model(model)
    return model.SerializeToString()


def graph_digest(path: Path) -> str:
    return sha256_file(Path(path))


class GraphFeatures:
    """Features of uint8 images ``(N, S, S)`` through a features graph, with ONNX Runtime."""

    def __init__(self, graph: Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])

    def __call__(self, images: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(images)[:, None]
        return self.session.run([ONNX_FEATURES], {ONNX_INPUT: batch})[0].astype(np.float32)
