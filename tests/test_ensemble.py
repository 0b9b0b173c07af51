"""Ensemble bundles: combined logits, every prediction path, the digest chain, hostile layouts, named models."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import D224, real_images
from corpus import REAL

from pneumoscan import Classifier
from pneumoscan.core.errors import ConfigError
from pneumoscan.core.metrics import sigmoid
from pneumoscan.io.images import prepare
from pneumoscan.model.ensemble import Ensemble, write_ensemble
from pneumoscan.model.schema import CONFIG, WEIGHTS
from pneumoscan.model.store import default_bundle_path, load_bundle, resolve_model
from pneumoscan.training.ensemble import make_ensemble, member_name

EXAMPLES = sorted((default_bundle_path().parent / "examples").rglob("*.jpeg"))


@pytest.fixture(scope="module")
def shipped():
    return load_bundle("fast")  # a single bundle: the default ensemble's primary member


@pytest.fixture(scope="module")
def ensemble(shipped, trained_bundle, tmp_path_factory):
    """The shipped model (primary, with gate, subtype head, fp32 and int8 ONNX) and the small trained
    bundle (other weights, no ONNX model), written by the one ensemble writer with temperature 1.3."""
    out = tmp_path_factory.mktemp("ens") / "ensemble"
    config = {"image_size": 224, "threshold": 0.5, "temperature": 1.3, "threshold_rule": "balanced", "name": "pair"}
    write_ensemble(out, config, {}, [("fast", shipped), ("small", trained_bundle)])
    return load_bundle(out)


@pytest.fixture(scope="module")
def clf(ensemble):
    return Classifier.load(ensemble.path, gate=False)


def _images(n=6):
    files = real_images("test", "NORMAL", n) + real_images("test", "PNEUMONIA", n)
    return files, np.stack([prepare(f, 224) for f in files])


@pytest.mark.data
def test_combined_logit_is_the_mean_of_calibrated_member_logits(ensemble, clf, shipped, trained_bundle):
    assert isinstance(ensemble, Ensemble) and ensemble.member_names == ["fast", "small"]
    files, images = _images()
    logits, features = clf.outputs(images)
    members = []
    for bundle in (shipped, trained_bundle):
        member_logits, member_features = Classifier(bundle, gate=False).outputs(images)
        members.append((member_logits / bundle.temperature, member_features))
    expected = (members[0][0] + members[1][0]) / 2
    assert np.allclose(logits, expected, atol=1e-5)
    assert not np.allclose(members[0][0], members[1][0], atol=0.1)  # two different networks
    assert np.allclose(features, members[0][1])  # the primary's features feed the gate and the subtype head
    p = [r.probability for r in clf.predict(files)]
    assert np.allclose(p, sigmoid(expected, 1.3), atol=1e-6)  # then the ensemble's own temperature
    assert clf.engine.name == "onnx-int8+onnx"  # each member its default: the shipped int8, the small a cached export


def test_predict_gate_and_subtype_come_from_the_primary(ensemble):
    from ood import photographs

    gated = Classifier.load(ensemble.path)
    results = gated.predict(EXAMPLES)
    assert all(r.ok and r.gate_score is not None for r in results)
    assert {r.subtype for r in results if r.label == "PNEUMONIA"} <= {"bacterial", "viral"}
    assert any(r.subtype for r in results)
    refused = gated.predict([photographs()["chelsea"]])[0]
    assert not refused.ok and "chest X-ray" in refused.error


def test_grad_cam_explains_the_primary_for_the_ensembles_class(ensemble, clf, shipped):
    explanation = clf.explain(REAL)
    result = clf.predict_one(REAL)
    assert explanation.probability == pytest.approx(result.probability, abs=1e-6)
    assert explanation.label == result.label and "primary member fast" in explanation.model
    primary = Classifier(shipped, gate=False).explain_class(REAL, positive=result.label == "PNEUMONIA")
    assert np.allclose(explanation.heatmap, primary.heatmap)


def test_int8_runs_every_member_that_has_one(ensemble):
    with pytest.warns(UserWarning, match="member small has no int8 model: it runs its fp32 model"):
        clf = Classifier.load(ensemble.path, int8=True, gate=False)
    assert clf.engine.name == "onnx-int8+onnx" and clf.engine.features_from == "onnx-int8"
    fp32 = Classifier.load(ensemble.path, gate=False).predict(EXAMPLES)
    int8 = clf.predict(EXAMPLES)
    assert np.corrcoef([r.probability for r in fp32], [r.probability for r in int8])[0, 1] > 0.9


def test_serve_and_evaluate_an_ensemble(ensemble, tmp_path):
    from fastapi.testclient import TestClient

    from pneumoscan.evaluation.evaluate import evaluate
    from pneumoscan.serving.service import create_app

    client = TestClient(create_app(model=str(ensemble.path)))
    r = client.post("/v1/predict", files={"file": ("x.jpeg", REAL.read_bytes())}, params={"cam": "true"})
    assert r.status_code == 200 and r.json()["cam"] and r.json()["model"] == "pair"
    info = client.get("/v1/model").json()
    assert "primary member" in info["model_card"] and "`small`" in info["model_card"]
    summary = evaluate(
        default_bundle_path().parent / "examples", None, [str(ensemble.path)], tmp_path, n_resamples=50, progress=False
    )
    report = summary["models"][0]
    assert report["n"] == 16 and report["model"]["backbone"] == "efficientnet_lite0+efficientnet_lite0"
    assert "gate" in report and (tmp_path / "predictions.csv").is_file()


@pytest.mark.data
def test_make_ensemble_fits_its_temperature_on_the_shared_validation_split(trained_bundle, small_data, tmp_path):
    """Two members trained on the same split (the small bundle, and a copy of it at another temperature):
    the ensemble's temperature minimises the log loss of the combined logits on that validation split."""
    from pneumoscan.core.metrics import fit_temperature

    first = trained_bundle
    twin = first.write_copy(tmp_path / "twin", {**first.config, "temperature": first.temperature * 2}, {})
    out = tmp_path / "made"
    done = subprocess.run(
        [sys.executable, "-m", "pneumoscan.cli", "ensemble", first.path, twin.path, "--out", out,
         "--names", "fast,twin", "--bootstrap", "50", "--quiet"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    made = load_bundle(out)
    assert made.member_names == ["fast", "twin"] and made.threshold == 0.5
    validation = made.metrics["validation"]
    _, samples = first.training_splits()  # the split the members recorded, of the data they recorded
    assert validation["n"] == len(samples) == first.config["training"]["validation"]["images"]
    recorded = {m["name"]: m["config_sha256"] for m in made.config["members"]}
    assert recorded["twin"] == hashlib.sha256((out / "members/twin" / CONFIG).read_bytes()).hexdigest()
    # the ensemble temperature is the one that minimises validation log loss of the combined logits
    images = np.stack([prepare(s.path, 224) for s in samples])
    z = Classifier(made, gate=False).logits(images)
    y = np.array([s.label for s in samples])

    def loss(t):
        p = np.clip(sigmoid(z, t), 1e-12, 1 - 1e-12)
        return -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))

    assert made.temperature == pytest.approx(fit_temperature(y, z), rel=1e-3) and made.temperature != 1.0
    assert loss(made.temperature) < min(loss(made.temperature * 0.8), loss(made.temperature * 1.25))
    assert "Grad-CAM explains the primary member" in (out / "MODEL_CARD.md").read_text()
    # and calibrate writes a recalibrated ensemble, members carried over
    from pneumoscan.training.calibrate import calibrate_bundle

    calibrated, _ = calibrate_bundle(
        small_data, tmp_path / "site", model=out, split="test", n_resamples=50, progress=False
    )
    again = load_bundle(calibrated.path)
    assert isinstance(again, Ensemble) and again.config["calibration"]["source"] == made.name
    assert again.members[1].weights_sha256 == twin.weights_sha256


@pytest.mark.data
def test_members_of_other_validation_designs_share_only_what_none_trained_on(shipped, tmp_path):
    """A member trained with the temporal design and one trained with random patients: the ensemble's
    temperature is fitted on the images held out of both."""
    from pneumoscan.io.dataset import training_splits

    recipe = {**shipped.config["training"]["recipe"], "val_source": "temporal", "val_fraction": 0.2}
    temporal = shipped.write_copy(
        tmp_path / "temporal", {**shipped.config, "training": {**shipped.config["training"], "recipe": recipe}}, {}
    )
    root = D224
    both = {s.path.resolve() for s in training_splits(root, "patients", 0.1, 0)[1]} & {
        s.path.resolve() for s in training_splits(root, "temporal", 0.2, 0)[1]
    }
    with pytest.warns(UserWarning, match=f"use the {len(both)} of the primary's 525 validation images"):
        made = make_ensemble(
            [shipped.path, temporal.path], tmp_path / "made", data=root, n_resamples=20, progress=False
        )
    assert made.metrics["validation"]["n"] == len(both) and 10 < len(both) < 525


def test_members_that_share_too_few_held_out_images_are_refused(shipped, trained_bundle, tmp_path):
    with pytest.raises(ConfigError, match="held out of every member's training") as exc:
        make_ensemble([shipped.path, trained_bundle.path], tmp_path / "x", progress=False)
    assert _one_line(exc)
    with pytest.raises(ConfigError, match="cannot be a member of another ensemble"):
        make_ensemble([shipped.path, _copy(shipped_ensemble_path(tmp_path, shipped), tmp_path / "e2")], tmp_path / "y")


def shipped_ensemble_path(tmp_path, shipped):
    out = tmp_path / "single-member"
    if not out.exists():
        config = {"image_size": 224, "threshold": 0.5, "temperature": 1.0}
        write_ensemble(out, config, {}, [("fast", shipped)])
    return out


def _copy(src, dst):
    return shutil.copytree(src, dst, symlinks=True)


def _one_line(exc_info):
    return len(str(exc_info.value).splitlines()) == 1


def test_tampered_members_are_refused(ensemble, tmp_path):
    bad = _copy(ensemble.path, tmp_path / "weights")
    weights = bad / "members/small" / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="model.safetensors: sha256 does not match") as exc:
        load_bundle(bad)
    assert _one_line(exc)
    bad = _copy(ensemble.path, tmp_path / "config")
    config_path = bad / "members/small" / CONFIG
    config = json.loads(config_path.read_text())
    config["threshold"] = 0.1  # a valid member config, but not the one the ensemble recorded
    config_path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="sha256 does not match the ensemble's config.json") as exc:
        load_bundle(bad)
    assert _one_line(exc)


def _with_members(path, members):
    config = json.loads((path / CONFIG).read_text())
    config["members"] = members
    (path / CONFIG).write_text(json.dumps(config))


@pytest.mark.parametrize("name", ["..", "../small", "a/b", "/etc", "Small", "", "x" * 33])
def test_member_names_are_never_paths(ensemble, tmp_path, name):
    bad = _copy(ensemble.path, tmp_path / "names")
    digest = json.loads((bad / CONFIG).read_text())["members"][1]["config_sha256"]
    _with_members(bad, [json.loads((bad / CONFIG).read_text())["members"][0], {"name": name, "config_sha256": digest}])
    with pytest.raises(ConfigError, match="member name") as exc:
        load_bundle(bad)
    assert _one_line(exc)


def test_symlinked_nested_and_misfit_members_are_refused(ensemble, shipped, tmp_path):
    linked = _copy(ensemble.path, tmp_path / "linked")
    shutil.move(linked / "members/small", tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", linked / "members/small")
    with pytest.raises(ConfigError, match="is a symbolic link"):
        load_bundle(linked)
    linked_root = _copy(ensemble.path, tmp_path / "linked-root")
    shutil.move(linked_root / "members", tmp_path / "members-elsewhere")
    os.symlink(tmp_path / "members-elsewhere", linked_root / "members")
    with pytest.raises(ConfigError, match="is a symbolic link"):
        load_bundle(linked_root)

    nested = _copy(ensemble.path, tmp_path / "nested")
    shutil.rmtree(nested / "members/small")
    _copy(shipped_ensemble_path(tmp_path, shipped), nested / "members/small")
    members = json.loads((nested / CONFIG).read_text())["members"]
    members[1]["config_sha256"] = hashlib.sha256((nested / "members/small" / CONFIG).read_bytes()).hexdigest()
    _with_members(nested, members)
    with pytest.raises(ConfigError, match="a member must be a single model"):
        load_bundle(nested)

    too_many = _copy(ensemble.path, tmp_path / "many")
    _with_members(too_many, json.loads((too_many / CONFIG).read_text())["members"] * 9)
    with pytest.raises(ConfigError, match="1 to 8 members"):
        load_bundle(too_many)


def test_members_of_another_image_size_are_refused(shipped, tmp_path):
    from pneumoscan.model.bundle import save_bundle
    from pneumoscan.model.networks import create_model

    config = {k: v for k, v in shipped.config.items() if k not in ("files", "weights_sha256", "pretrained")}
    small = save_bundle(
        tmp_path / "s96", create_model("efficientnet_lite0", weights=None, image_size=96), {**config, "image_size": 96}
    )
    with pytest.raises(ConfigError, match="image_size 96 differs from the primary's 224"):
        make_ensemble([shipped.path, small.path], tmp_path / "out", progress=False)
    out = write_ensemble(tmp_path / "mixed", {"image_size": 224, "threshold": 0.5, "temperature": 1.0}, {},
                         [("fast", shipped)]).path  # fmt: skip
    _copy(small.path, out / "members/s96")
    members = json.loads((out / CONFIG).read_text())["members"]
    members.append(
        {"name": "s96", "config_sha256": hashlib.sha256((out / "members/s96" / CONFIG).read_bytes()).hexdigest()}
    )
    _with_members(out, members)
    with pytest.raises(ConfigError, match=r"s96/config.json: image_size 96 differs from the ensemble's 224") as exc:
        load_bundle(out)
    assert _one_line(exc)


def test_verify_checks_every_member(ensemble):
    from pneumoscan.evaluation.verify import verify_bundle

    checks = verify_bundle(ensemble.path)
    assert [c.engine for c in checks] == ["fast:onnx", "fast:onnx-int8"]  # the small member has no ONNX model
    assert all(c.ok for c in checks)


def test_bundled_models_by_name_and_a_path_wins(tmp_path, monkeypatch):
    assert resolve_model("default") == default_bundle_path()
    assert resolve_model("fast") == default_bundle_path()  # the name earlier releases gave the same model
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fast").mkdir()  # an existing folder of that name is what --model means
    with pytest.raises(ConfigError, match="fast: not a model bundle"):
        load_bundle("fast")
    with pytest.raises(ConfigError, match=r"not a bundled model's name \(default, fast\)"):
        load_bundle("fastest")
    shutil.rmtree(tmp_path / "fast")
    with pytest.raises(ConfigError, match="fast: not a model bundle"):
        load_bundle("./fast")  # written as a path: never a name
    done = subprocess.run(
        [sys.executable, "-m", "pneumoscan.cli", "models"], capture_output=True, text=True, timeout=120
    )
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and lines[0].startswith("default ") and "AUC 0.972" in done.stdout
    assert any(line.startswith("fast ") and "the same model as default" in line for line in lines)


def test_ensemble_and_models_options_are_explained_and_errors_are_one_line(tmp_path):
    from pneumoscan.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for command in ("ensemble", "models"):
        assert all(a.help for a in sub[command]._actions if a.option_strings and a.dest != "help")
    done = subprocess.run(
        [sys.executable, "-m", "pneumoscan.cli", "ensemble", resolve_model("fast"), "--names", "../up",
         "--out", tmp_path / "e"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "member name '../up'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "e").exists()


def test_member_names_come_from_the_run_folder_of_a_trained_bundle(tmp_path):
    """``pneumoscan ensemble runs/a/model runs/b/model`` names its members a and b, as the docs show."""
    assert member_name(tmp_path / "runs" / "Mine 2" / "model") == "mine-2"
    assert member_name(tmp_path / "received-bundle") == "received-bundle"
    assert member_name(tmp_path / "runs" / "quick" / "model") != member_name(tmp_path / "runs" / "mine" / "model")
