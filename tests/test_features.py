"""Frozen-feature mode: features computed once, cached as safetensors, found again; the temporal split."""

import os

import numpy as np
import pytest
from conftest import real_images

from pneumoscan.io.dataset import Sample, load_split, patient_id, patient_series, split_by_number
from pneumoscan.model.networks import create_model
from pneumoscan.training import features as F

pytestmark = pytest.mark.data


def _samples(n: int) -> list[Sample]:
    paths = real_images("train", "NORMAL", n) + real_images("train", "PNEUMONIA", n)
    return [Sample(p, int("PNEUMONIA" in str(p)), patient_id(p.name)) for p in paths]


def test_features_are_cached_and_equal_the_network(tmp_path, monkeypatch):
    samples = _samples(2)
    feats, kept, errors = F.frozen_features("efficientnet_lite0", samples, 224, cache=tmp_path, progress=False)
    assert feats.shape == (4, 1280) and kept == samples and errors == []
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"

    import torch

    from pneumoscan.io.images import prepare

    net = create_model("efficientnet_lite0").eval()
    with torch.inference_mode():
        direct = net.features(torch.from_numpy(np.stack([prepare(s.path, 224) for s in samples]))[:, None]).numpy()
    assert np.abs(direct - feats).max() < 1e-4

    computed = []
    real_compute = F._compute
    monkeypatch.setattr(
        F, "_compute", lambda be, missing, *a: computed.append(missing) or real_compute(be, missing, *a)
    )
    subset = samples[1:3][::-1]  # another list, other order: nothing recomputed
    again, kept_again, _ = F.frozen_features("efficientnet_lite0", subset, 224, cache=tmp_path, progress=False)
    assert computed == [] and kept_again == subset and np.array_equal(again, feats[[2, 1]])
    more = samples + _samples(3)[1:2]  # one new image: only it is computed
    feats_more, _, _ = F.frozen_features("efficientnet_lite0", more, 224, cache=tmp_path, progress=False)
    assert [len(m) for m in computed] == [1] and np.array_equal(feats_more[:4], feats)
    assert F.frozen_features("efficientnet_lite0", samples, 192, cache=tmp_path, progress=False)[0].shape == (4, 1280)
    assert [len(m) for m in computed] == [1, 4]  # another image size is another cache


def test_image_key_follows_path_size_and_time(tmp_path):
    a = tmp_path / "a.jpeg"
    a.write_bytes(b"x")
    key = F.image_key(a)
    os.utime(a, ns=(1, 1))
    assert F.image_key(a) != key


def test_unreadable_images_are_reported_not_fatal(tmp_path):
    bad = tmp_path / "NORMAL" / "IM-9999-0001.jpeg"
    bad.parent.mkdir()
    bad.write_bytes(b"not an image")
    samples = _samples(1) + [Sample(bad, 0, "IM-9999")]
    feats, kept, errors = F.frozen_features("efficientnet_lite0", samples, 224, cache=tmp_path / "c", progress=False)
    assert feats.shape == (2, 1280) and len(kept) == 2 and len(errors) == 1 and "IM-9999-0001" in errors[0]


def test_temporal_split_holds_out_the_highest_numbers_of_each_series():
    from conftest import D224

    train = load_split(D224, "train")
    rest, held = split_by_number(train, 0.2)
    assert not {s.patient for s in rest} & {s.patient for s in held}
    assert len(rest) + len(held) == len(train)
    for label in (0, 1):
        series = {patient_series(s.patient)[0] for s in train if s.label == label}
        for name in series:
            kept = [
                patient_series(s.patient)[1] for s in rest if s.label == label and s.patient.upper().startswith(name)
            ]
            out = [
                patient_series(s.patient)[1] for s in held if s.label == label and s.patient.upper().startswith(name)
            ]
            assert out and max(kept) < min(out)
    assert patient_series("NORMAL2-IM-1423") == ("NORMAL2-IM-", 1423) and patient_series("scan_7") is None


@pytest.mark.parametrize("head", ["logistic", "mlp"])
def test_train_frozen_features_writes_a_working_bundle(small_data, tmp_path, head):
    from pneumoscan.core import metrics as M
    from pneumoscan.io.dataset import load_images
    from pneumoscan.model.backbones import REGISTRY
    from pneumoscan.model.networks import predict_logits
    from pneumoscan.training.recipe import TrainConfig
    from pneumoscan.training.trainer import train

    cfg = TrainConfig(
        data=str(small_data), out=str(tmp_path / "run"), frozen_features=True, head=head, val_fraction=0.3
    )
    cfg.progress = False
    bundle = train(cfg)
    config = bundle.config
    assert config["pretrained"]["sha256"] == REGISTRY["efficientnet_lite0"].weights.sha256
    assert config["training"]["recipe"]["head"] == head and config["hidden"] == (2 if head == "logistic" else 128)
    assert {"gate.safetensors", "subtype.safetensors"} <= set(config["files"])
    # the stored network gives the validation AUC the head was chosen with (the head is stored exactly)
    val = bundle.training_splits(small_data)[1]
    images, val, _ = load_images(val, 224, progress=False)
    logits = predict_logits(bundle.load_net(), images)
    y = [s.label for s in val]
    assert M.roc_auc(y, logits) == pytest.approx(config["training"]["best_val_auc"], abs=1e-6)
    assert config["training"]["best_val_auc"] > 0.8
    assert "kept frozen" in (bundle.path / "MODEL_CARD.md").read_text()
