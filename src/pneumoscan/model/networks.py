"""Backbones, their ImageNet weights, and the pneumonia classifier built on them.

Every backbone is flattened into one ``nn.Sequential`` of units: the stem, each inverted
residual block, the final 1x1 convolution, then global pooling. That one shape makes the
rest simple: "unfreeze the last K blocks" is a slice, the frozen prefix can be compiled for
speed, and Grad-CAM hooks the unit before the pooling.

The model takes what :func:`pneumoscan.io.images.prepare` makes, uint8 grey images of shape
``(N, 1, S, S)``, and does its own normalisation (grey to three channels, ImageNet mean and
std), so the PyTorch and ONNX paths share one preprocessing definition.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from pneumoscan.core.errors import ConfigError
from pneumoscan.io.images import NORMALIZATION
from pneumoscan.model.backbones import HEAD, REGISTRY, check_image_size, get_backbone, weights_file

IMAGENET_MEAN = tuple(NORMALIZATION["mean"])
IMAGENET_STD = tuple(NORMALIZATION["std"])
# EfficientNet-Lite0 blocks per stage, as in the lukemelas checkpoint's flat `_blocks.N`.
LITE0_REPEATS = (1, 2, 2, 3, 3, 4, 1)


class GreyToImageNet(nn.Module):
    """uint8 (or 0-255 float) grey images -> normalised 3-channel float images."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, 3, 1, 1)))
        self.register_buffer("shift", (torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self.scale - self.shift  # (N,1,S,S) broadcasts to (N,3,S,S)


class PneumoniaNet(nn.Module):
    """Normalisation, a flattened backbone (``body``), and a small dense head giving one logit."""

    def __init__(
        self, body: nn.Sequential, n_features: int, hidden: int = HEAD["hidden"], dropout: float = HEAD["dropout"]
    ):
        super().__init__()
        self.hidden = hidden
        self.normalize = GreyToImageNet()
        self.body = body
        self.head = nn.Sequential(
            nn.Linear(n_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, 1)
        )

    @property
    def n_blocks(self) -> int:
        """Blocks between the stem and the final convolution."""
        return len(self.body) - 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of PNEUMONIA, shape (N,)."""
        return self.head(self.features(x)).squeeze(1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled backbone features the head reads, shape (N, F): what the input gate scores."""
        return self.body(self.normalize(x))

    def trainable_split(self, unfreeze: int) -> int:
        """Index into ``body`` where the trainable part starts when the last ``unfreeze`` blocks
        (and the final convolution with them) train; ``len(body) - 1`` means only the head."""
        if not 0 <= unfreeze <= self.n_blocks:
            raise ConfigError(f"--unfreeze must be between 0 and {self.n_blocks} for this backbone, got {unfreeze}")
        return len(self.body) - 1 - (unfreeze + 1 if unfreeze else 0)

    def set_trainable(self, unfreeze: int) -> int:
        """Freeze everything but the head and the last ``unfreeze`` blocks; returns the split index."""
        split = self.trainable_split(unfreeze)
        for i, unit in enumerate(self.body):
            unit.requires_grad_(i >= split)
        self.head.requires_grad_(True)
        return split


class WithFeatures(nn.Module):
    """The network with three outputs (what the ONNX export holds): logits, the pooled features, and the
    last feature map they pool (``body[-2]``'s output, the layer Grad-CAM explains)."""

    def __init__(self, net: PneumoniaNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor):
        feature_map = self.net.body[:-1](self.net.normalize(x))
        features = self.net.body[-1](feature_map)
        return self.net.head(features).squeeze(1), features, feature_map


def export_graph(net: nn.Module, image_size: int, out: Path, outputs: list[str]) -> None:
    """``net`` (uint8 grey ``(N, 1, S, S)`` in) as an ONNX graph at ``out`` with these output names, the batch
    dimension dynamic: the one ONNX export of the package (bundles, frozen backbones). The TorchScript
    exporter is deprecated in favour of torch.export, but it handles these networks without extra
    dependencies and its output is tested for parity; its notices and tracer warnings are silenced."""
    import warnings

    from pneumoscan.model.schema import ONNX_INPUT

    example = torch.zeros((1, 1, image_size, image_size), dtype=torch.uint8)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net.eval(),
            (example,),
            str(out),
            dynamo=False,
            opset_version=17,
            input_names=[ONNX_INPUT],
            output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in (ONNX_INPUT, *outputs)},
        )


def predict_logits(net: nn.Module, images: np.ndarray, batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """Logits for uint8 images ``(N,S,S)`` through a network in eval mode (no augmentation)."""
    return predict_outputs(net, images, batch_size, progress)[0]


def predict_outputs(
    net: PneumoniaNet, images: np.ndarray, batch_size: int = 64, progress: bool = False, desc: str = "predicting"
) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``(N,)`` and pooled features ``(N, F)`` for uint8 images ``(N,S,S)``, in eval mode; ``progress``
    shows a bar over the images on stderr."""
    from tqdm import tqdm

    net = net.eval()
    logits, features = [], []
    with torch.inference_mode(), tqdm(total=len(images), desc=desc, unit="img", disable=not progress) as bar:
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).unsqueeze(1)
            f = net.features(batch)
            logits.append(net.head(f).squeeze(1).float().numpy())
            features.append(f.float().numpy())
            bar.update(len(batch))
    if not logits:
        return np.zeros(0, np.float32), np.zeros((0, net.head[0].in_features), np.float32)
    return np.concatenate(logits), np.concatenate(features)


def create_model(
    backbone: str = "efficientnet_lite0",
    *,
    weights: str | Path | None = "imagenet",
    dropout: float = HEAD["dropout"],
    hidden: int = HEAD["hidden"],
    image_size: int = 224,
) -> PneumoniaNet:
    """A classifier on a pretrained backbone of the registry (:mod:`pneumoscan.model.backbones`).

    ``weights``: ``"imagenet"`` for the registry's pretrained weights (from an installed package,
    sha256 checked; downloaded for MobileNetV2 where the machine is online), a path to a
    torchvision or timm checkpoint, or ``None`` for random weights (used when a trained
    bundle's weights are loaded over them). ``image_size`` matters only to ViTs (position grid).
    """
    body, n_features = _backbone_body(backbone, weights, image_size)
    return PneumoniaNet(body, n_features, hidden=hidden, dropout=dropout)


def imagenet_classifier(backbone: str = "efficientnet_lite0", weights: str | Path | None = "imagenet") -> nn.Module:
    """The backbone with its ImageNet classifier, taking the same uint8 input (for checking weights)."""
    if not backbone.startswith("efficientnet_lite"):
        raise ConfigError("only the EfficientNet-Lite backbones are checked against ImageNet classes")
    net = _timm_lite(backbone, weights)
    return nn.Sequential(GreyToImageNet(), *_timm_units(net), net.classifier)


def _backbone_body(backbone: str, weights, image_size: int = 224) -> tuple[nn.Sequential, int]:
    get_backbone(backbone)  # a clear error for an unknown name
    check_image_size(backbone, image_size)
    body, n_features = BUILDERS[backbone](weights, image_size)
    assert n_features == REGISTRY[backbone].feature_size, (backbone, n_features)
    return body, n_features


def _lite_body(name: str):
    def build(weights, image_size: int) -> tuple[nn.Sequential, int]:
        net = _timm_lite(name, weights)
        return nn.Sequential(*_timm_units(net)), net.num_features

    return build


def _dinov2_body(weights, image_size: int) -> tuple[nn.Sequential, int]:
    from pneumoscan.model.vit import dinov2_units

    return dinov2_units(weights, image_size), REGISTRY["dinov2_vits14"].feature_size


def _timm_units(net: nn.Module) -> list[nn.Module]:
    blocks = [block for stage in net.blocks for block in stage]
    return [nn.Sequential(net.conv_stem, net.bn1), *blocks, nn.Sequential(net.conv_head, net.bn2), _pool()]


def _pool() -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _timm_lite0(weights) -> nn.Module:
    return _timm_lite("efficientnet_lite0", weights)


def _timm_lite(name: str, weights) -> nn.Module:
    """timm's EfficientNet-Lite ``name`` with the registry's weights (``"imagenet"``), a checkpoint, or none."""
    import timm

    net = timm.create_model(name, pretrained=False)
    for module in net.modules():  # TensorFlow's batch-norm epsilon, which the weights were trained with
        if isinstance(module, nn.BatchNorm2d):
            module.eps = 1e-3
    if weights is None:
        return net
    if weights == "imagenet":
        weights = weights_file(name)
    state = _load_checkpoint(weights)
    if any(k.startswith("_blocks.") for k in state):
        state = lite_from_lukemelas(state, tuple(len(stage) for stage in net.blocks))
    _load_strict(net, state, weights)
    return net


def lite0_from_lukemelas(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style EfficientNet-Lite0 state dict onto timm's ``efficientnet_lite0``."""
    return lite_from_lukemelas(state, LITE0_REPEATS)


def lite_from_lukemelas(state: dict[str, torch.Tensor], repeats: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style EfficientNet-Lite state dict (flat ``_blocks.N``) onto timm's names,
    given the blocks per stage (Lite0: 1,2,2,3,3,4,1; Lite2: 1,3,3,4,4,5,1)."""
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    first_block = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    other_blocks = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    where = [(stage, i) for stage, n in enumerate(repeats) for i in range(n)]
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            stage, i = where[int(parts[1])]
            names = first_block if stage == 0 else other_blocks
            out[".".join(["blocks", str(stage), str(i), names[parts[2]], *parts[3:]])] = value
        else:
            out[".".join([top[parts[0]], *parts[1:]])] = value
    return out


def _mobilenet_v2_body(weights, image_size: int = 224) -> tuple[nn.Sequential, int]:
    if weights is None:
        import torchvision

        return _torchvision_mnv2_units(torchvision.models.mobilenet_v2()), 1280
    if weights == "imagenet":
        import torchvision

        try:
            net = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1")
        except Exception as exc:  # noqa: BLE001 - offline machines end up here
            raise ConfigError(
                "mobilenet_v2 needs ImageNet weights and they could not be downloaded "
                f"({type(exc).__name__}); pass --weights FILE with a torchvision or timm checkpoint"
            ) from None
        return _torchvision_mnv2_units(net), 1280
    state = _load_checkpoint(weights)
    if "features.0.0.weight" in state:
        import torchvision

        net = torchvision.models.mobilenet_v2()
        _load_strict(net, state, weights)
        return _torchvision_mnv2_units(net), 1280
    if "conv_stem.weight" in state:
        import timm

        net = timm.create_model("mobilenetv2_100", pretrained=False)
        _load_strict(net, state, weights)
        return nn.Sequential(*_timm_units(net)), net.num_features
    raise ConfigError(
        f"{weights}: not a torchvision or timm MobileNetV2 checkpoint (no features.0.0.weight or conv_stem.weight)"
    )


def _torchvision_mnv2_units(net: nn.Module) -> nn.Sequential:
    return nn.Sequential(*net.features, _pool())


def _load_checkpoint(path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {str(exc)[:120]})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigError(f"{path}: checkpoint holds no state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_strict(net: nn.Module, state: dict, source) -> None:
    """Load every backbone weight; only a classifier of another shape may be left out."""
    own = net.state_dict()
    classifier = {k for k in own if k.startswith(("classifier", "fc."))}
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in usable and k not in classifier]
    if missing:
        raise ConfigError(
            f"{source}: checkpoint does not match the architecture ({len(missing)} weights missing, e.g. {missing[0]})"
        )
    net.load_state_dict(usable, strict=False)


BUILDERS = {  # one builder per registry entry: weights ("imagenet" = the registry's, a path, or None) -> body
    "efficientnet_lite0": _lite_body("efficientnet_lite0"),
    "efficientnet_lite2": _lite_body("efficientnet_lite2"),
    "dinov2_vits14": _dinov2_body,
    "mobilenet_v2": _mobilenet_v2_body,
}
assert set(BUILDERS) == set(REGISTRY), "every registered backbone needs a builder"
