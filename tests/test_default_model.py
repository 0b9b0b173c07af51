"""The bundled model: it loads after install, is what the README says, and the draft decoding is safe for it."""

import numpy as np
import pytest
from conftest import FULLRES, VAL_FULLRES

from pneumoscan import Classifier
from pneumoscan.io.dataset import list_images
from pneumoscan.io.images import Preprocessing, load_image, prepare
from pneumoscan.model.card import model_card
from pneumoscan.model.ensemble import Ensemble
from pneumoscan.model.store import default_bundle_path, load_bundle, resolve_model


@pytest.fixture(scope="module")
def clf():
    return Classifier.load(engine="torch")


@pytest.mark.data
def test_bundle_is_small_complete_and_verified():
    """The default is the fine-tuned EfficientNet-Lite0 (also named ``fast``), inside the repository's budgets,
    with its test reads recorded, its preprocessing stated, and the card regenerated from it."""
    path = default_bundle_path()
    sizes = [f.stat().st_size for f in path.parent.rglob("*") if f.is_file() and "default_model" in f.parts]
    assert max(sizes) <= 50 * 2**20 and sum(sizes) <= 60 * 2**20  # per file; all bundled models together
    bundle = load_bundle()
    assert not isinstance(bundle, Ensemble) and bundle.backbone == "efficientnet_lite0"
    assert resolve_model("fast").resolve() == resolve_model("default").resolve() == path.resolve()
    assert set(bundle.config["files"]) == {"model.onnx", "model.int8.onnx", "gate.safetensors", "subtype.safetensors"}
    assert bundle.version and bundle.preprocessing == Preprocessing(224, "bilinear", 75)
    assert {"validation", "test"} <= set(bundle.metrics)
    assert bundle.metrics["test"]["n"] == 624 and bundle.metrics["test"]["ci95"]["auc"]
    assert bundle.threshold == 0.5 and bundle.config["threshold_rule"] == "balanced"
    assert bundle.metrics["test"]["threshold"] == 0.5 and bundle.metrics["validation"]["threshold"] == 0.5
    from conftest import D224

    train, val = bundle.training_splits(D224)  # the recipe's own patient split, as recorded
    assert bundle.config["training"]["train"]["images"] == len(train) == 4691
    assert bundle.metrics["validation"]["n"] == len(val) == 525
    card = (bundle.path / "MODEL_CARD.md").read_text()
    assert "not a medical device" in card and "| test (624 images" in card
    assert card == model_card(bundle)  # regenerated whenever the card's template changes


@pytest.mark.data
def test_bundled_model_separates_the_official_val_images(clf):
    """The 16 official val images (never trained on): all pneumonia cases rank above most normals."""
    from pneumoscan.core.metrics import roc_auc

    files = list_images(VAL_FULLRES)
    y = [int("PNEUMONIA" in str(f)) for f in files]
    assert roc_auc(y, [r.probability for r in clf.predict(files)]) > 0.9


@pytest.mark.data
def test_draft_jpeg_decoding_changes_probabilities_by_less_than_0_01(clf):
    files = list_images(FULLRES)
    assert len(files) == 48
    full = np.stack([clf.bundle.preprocessing.apply(load_image(f)) for f in files])
    drafted = np.stack([prepare(f, clf.image_size) for f in files])
    assert not np.array_equal(full, drafted)  # the draft path really decoded at reduced scale
    diff = np.abs(clf.probabilities(clf.logits(full)) - clf.probabilities(clf.logits(drafted)))
    assert diff.max() < 0.01


def test_demo_runs_offline(tmp_path, monkeypatch):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "pneumoscan.cli", "demo", "--out", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-1000:]
    assert "report:" in done.stdout and len(list((tmp_path / "demo" / "gradcam").glob("*.cam.png"))) == 16
    recorded = load_bundle().metrics["test"]["auc"]
    assert f"held-out test split, 624 images: auc {recorded:.3f}" in done.stdout and "overstate" in done.stdout
    assert (tmp_path / "demo" / "report.html").stat().st_size > 100_000


def test_re_encodings_of_one_image_agree_within_0_01(clf):
    """The same X-ray as JPEG, PNG, 16-bit PNG, RGBA, palette, DICOM (both polarities) and EXIF-rotated JPEG."""
    from corpus import REAL, dicom, encode, exif_rotated, png16, real_grey
    from PIL import Image

    grey = real_grey()
    image = Image.fromarray(grey)
    versions = {
        "jpeg": REAL.read_bytes(),
        "png": encode(image, "PNG"),
        "png16": png16(grey),
        "rgba": encode(image.convert("RGBA"), "PNG"),
        "palette": encode(image.convert("P", palette=Image.Palette.ADAPTIVE, colors=256), "PNG"),
        "dicom": dicom(grey),
        "dicom-monochrome1": dicom(grey, "MONOCHROME1"),
        "exif-rotated": exif_rotated(grey),
    }
    results = clf.predict(list(versions.values()))
    probabilities = {name: r.probability for name, r in zip(versions, results)}
    assert all(r.ok for r in results)
    spread = max(probabilities.values()) - min(probabilities.values())
    assert spread < 0.01, probabilities


def test_every_bundled_model_has_a_version_that_traces():
    """/v1/model and the DICOM SR name each model by version: none is "" or "unversioned"."""
    from pneumoscan.io.dicom_sr import ModelInfo
    from pneumoscan.model.store import BUNDLED_MODELS

    bundles = [load_bundle(resolve_model(name)) for name in BUNDLED_MODELS]
    bundles += [m for b in bundles if isinstance(b, Ensemble) for m in b.members]
    for bundle in bundles:
        version = bundle.config.get("version", "")
        assert isinstance(version, str) and version.strip(), bundle.path
        assert ModelInfo.of(bundle).version == version != "unversioned"


def test_the_card_says_what_it_was_trained_on_and_whether_the_temperature_was_fitted(tmp_path):
    """A run on a user's own folder is not called the official train split; temperature 1 is "not fitted"."""
    import json
    import shutil

    fast = resolve_model("fast")
    assert "Trained on the official train split (4691 images" in model_card(load_bundle(fast))
    copy = shutil.copytree(fast, tmp_path / "mine")
    config = json.loads((copy / "config.json").read_text())
    config["training"].update(
        data="/home/me/xrays",
        train={"images": 160, "n_normal": 80, "n_pneumonia": 80, "patients": 150},
        validation={"images": 40, "n_normal": 20, "n_pneumonia": 20, "patients": 38},
    )
    config["temperature"] = 1.0
    (copy / "config.json").write_text(json.dumps(config))
    bundle = load_bundle(copy)
    card = model_card(bundle)
    assert "Trained on the folder /home/me/xrays (160 images: 80 NORMAL" in card
    assert "official train split" not in card and "Guangzhou" not in card
    assert "temperature 1 (not fitted)" in card and "temperature fitted" not in card
    assert "temperature 1 (not fitted)" in bundle.operating_point_source
