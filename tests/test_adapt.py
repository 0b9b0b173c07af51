"""pneumoscan adapt: batch-norm statistics re-estimated on a site's unlabelled films (real films throughout).

The site is imitated by darker, lower-contrast copies of real training films: a scanner whose exposure and
contrast differ. Adapting to them must bring the answers on them back towards the source model's answers on
the original films."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from conftest import D224, real_images
from PIL import Image

from pneumoscan.cli.main import main
from pneumoscan.core.errors import ConfigError
from pneumoscan.io.images import prepare
from pneumoscan.model.backbones import sha256_file
from pneumoscan.model.bundle import Bundle
from pneumoscan.model.store import default_bundle_path, load_bundle
from pneumoscan.training.adapt import MIN_FILMS, adapt_bundle, refuse_unadaptable

pytestmark = pytest.mark.data
SITE_FILMS = 60


def darker_lower_contrast(image: np.ndarray) -> np.ndarray:
    """Another scanner's exposure and contrast: contrast 0.6 about the mean, then exposure 0.7."""
    x = image.astype(np.float32)
    return np.clip(np.rint(((x - x.mean()) * 0.6 + x.mean()) * 0.7), 0, 255).astype(np.uint8)


def not_xrays(count: int) -> list[np.ndarray]:
    """Pictures that are no chest film: colour-free gradients and noise fields."""
    rng = np.random.default_rng(0)
    ramps = [np.tile(np.linspace(0, 255, 224), (224, 1)).astype(np.uint8)]
    return (ramps + [rng.integers(0, 256, (224, 224), dtype=np.uint8) for _ in range(count)])[:count]


def site_films() -> list:
    """60 real training films, a third NORMAL (spread over the folder, away from the first ones)."""
    normal = SITE_FILMS // 3
    return real_images("train", "NORMAL", normal, offset=3) + real_images("train", "PNEUMONIA", SITE_FILMS - normal, 3)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A site folder: darker, lower-contrast PNG copies of 60 real training films, 2 pictures that are no
    X-ray and one file that is not an image; and the original films' prepared images."""
    folder = tmp_path_factory.mktemp("site") / "ward-7"
    (folder / "more").mkdir(parents=True)
    films = site_films()
    originals = np.stack([prepare(f, 224) for f in films])
    for film, image in zip(films, originals):
        Image.fromarray(darker_lower_contrast(image)).save(folder / "more" / f"{film.stem}.png")
    for i, picture in enumerate(not_xrays(2)):
        Image.fromarray(picture).save(folder / f"picture-{i}.png")
    (folder / "broken.jpeg").write_bytes(b"not a JPEG at all")
    return folder, originals


@pytest.fixture(scope="module")
def adapted(site, tmp_path_factory):
    folder, _ = site
    out = tmp_path_factory.mktemp("adapted") / "bundle"
    bundle, record = adapt_bundle(folder, out, source_data=D224, progress=False)
    return bundle, record


def test_adapting_to_a_darker_scanner_brings_its_answers_back(site, adapted):
    from pneumoscan.inference.classifier import Classifier

    folder, originals = site
    bundle, _ = adapted
    shifted = np.stack([prepare(folder / "more" / f"{film.stem}.png", 224) for film in site_films()])
    source = Classifier.load(None, engine="torch")
    reference = source.logits(originals)
    before = np.abs(source.logits(shifted) - reference).mean()
    after = np.abs(Classifier(bundle, engine="torch").logits(shifted) - reference).mean()
    assert after < 0.7 * before, (before, after)


def test_only_batch_norm_statistics_change(adapted):
    from safetensors.numpy import load_file

    bundle, _ = adapted
    old, new = load_file(default_bundle_path() / "model.safetensors"), load_file(bundle.path / "model.safetensors")
    assert old.keys() == new.keys()
    moved = {k for k in old if not np.array_equal(old[k], new[k])}
    assert moved == {"body.0.1.running_mean", "body.0.1.running_var"}  # the stem's batch norm, nothing else


def test_the_record_says_which_films_and_what_was_kept(site, adapted):
    folder, _ = site
    bundle, record = adapted
    config = json.loads((bundle.path / "config.json").read_text())
    recorded = config["adaptation"]
    assert recorded == record
    assert recorded["data"] == "ward-7" and str(folder) not in json.dumps(config)
    assert (recorded["films"], recorded["refused_by_gate"], recorded["unreadable"]) == (SITE_FILMS, 2, 1)
    digests = sorted(sha256_file(p) for p in (folder / "more").glob("*.png"))
    assert recorded["films_sha256"] == hashlib.sha256("\n".join(digests).encode()).hexdigest()
    source = load_bundle(None)
    assert recorded["source_weights_sha256"] == source.weights_sha256 != bundle.weights_sha256
    assert recorded["source"] == source.name and recorded["source_version"] == source.version
    assert "adapted-ward-7" in bundle.name
    assert set(config["files"]) == {"model.onnx", "model.int8.onnx", "gate.safetensors"}  # no subtype head
    assert bundle.metrics == {}  # the source's metrics do not describe these weights
    card = (bundle.path / "MODEL_CARD.md").read_text()
    assert "## Adaptation" in card and "ward-7" in card and "not validated" in card
    assert recorded["gate_accepts_torch"] >= 0.95 and recorded["gate_accepts_onnx_int8"] >= 0.95


def test_the_adapted_bundle_predicts_on_every_engine_and_verifies(site, adapted, capsys):
    from pneumoscan.inference.classifier import Classifier

    folder, _ = site
    bundle, _ = adapted
    films = sorted((folder / "more").glob("*.png"))[:4]
    probabilities = []
    for engine, int8 in (("torch", False), ("onnx", False), ("onnx", True)):
        results = Classifier.load(bundle.path, engine=engine, int8=int8).predict(films)
        assert all(r.ok and r.subtype is None for r in results), results
        probabilities.append([r.probability for r in results])
    assert np.allclose(probabilities[0], probabilities[1], atol=1e-3)
    assert main(["verify", "--model", str(bundle.path)]) == 0
    assert "onnx-int8" in capsys.readouterr().out


def test_too_few_films_are_refused(tmp_path, capsys):
    folder = tmp_path / "few"
    folder.mkdir()
    for film in real_images("train", "NORMAL", 5) + real_images("train", "PNEUMONIA", 5):
        shutil.copy(film, folder / film.name)
    assert main(["adapt", "--data", str(folder), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"at least {MIN_FILMS}" in err and "10 films" in err
    assert not (tmp_path / "out").exists()


def test_a_folder_of_many_pictures_that_are_no_xrays_is_refused(tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for film in real_images("train", "NORMAL", 8):
        shutil.copy(film, folder / film.name)
    for i, picture in enumerate(not_xrays(4)):
        Image.fromarray(picture).save(folder / f"picture-{i}.png")
    assert main(["adapt", "--data", str(folder), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "4 of 12 films are refused by the input gate" in err


def test_ensembles_head_only_bundles_and_bundles_without_a_gate_are_refused(tmp_path):
    from pneumoscan.model.ensemble import Ensemble

    source = load_bundle(None)
    ensemble = Ensemble(tmp_path, {**source.config, "format": "pneumoscan-ensemble/1"}, members=[source])
    head_only = Bundle(source.path, {**source.config, "weights_scope": "head"})
    no_gate = shutil.copytree(source.path, tmp_path / "no-gate")
    config = json.loads((no_gate / "config.json").read_text())
    del config["files"]["gate.safetensors"]
    (no_gate / "config.json").write_text(json.dumps(config))
    for bundle, why in (
        (ensemble, "adapt each member"),
        (head_only, "no batch norm"),
        (load_bundle(no_gate), "no input gate"),
    ):
        with pytest.raises(ConfigError, match=why):
            refuse_unadaptable(bundle)
