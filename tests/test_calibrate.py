import json
import shutil

import numpy as np
import pytest

from pneumoscan import Classifier
from pneumoscan import metrics as M
from pneumoscan.bundle import load_bundle
from pneumoscan.calibrate import calibrate_bundle
from pneumoscan.cli import main
from pneumoscan.data import load_images, load_split
from pneumoscan.errors import ConfigError


@pytest.fixture(scope="module")
def local_set(small_data, tmp_path_factory):
    """The small test split plus one corrupt file: the 'labelled images of a new site'."""
    root = tmp_path_factory.mktemp("site")
    shutil.copytree(small_data / "test", root / "site", symlinks=True)
    (root / "site" / "NORMAL" / "IM-9999-0001.jpeg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root / "site"


@pytest.fixture(scope="module")
def calibrated(trained_bundle, local_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("calibrated") / "model"
    return calibrate_bundle(local_set, out, trained_bundle.path, n_resamples=200, progress=False)


def _labels_and_logits(bundle_path, folder):
    clf = Classifier.load(bundle_path, engine="torch")
    images, samples, _ = load_images(load_split(folder), clf.image_size, progress=False)
    return np.array([s.label for s in samples]), clf.logits(images)


def test_refits_temperature_and_youden_threshold_on_the_local_images(calibrated, trained_bundle, local_set):
    bundle, report = calibrated
    y, logits = _labels_and_logits(trained_bundle.path, local_set)
    assert bundle.temperature == pytest.approx(M.fit_temperature(y, logits), rel=1e-3)
    fitted, shipped = bundle.probabilities(logits), trained_bundle.probabilities(logits)
    assert M.log_loss(y, fitted) <= M.log_loss(y, shipped) + 1e-9  # the fitted temperature is the loss minimum

    def youden(p, t):
        m = M.binary_metrics(y, p, t)
        return m["sensitivity"] + m["specificity"] - 1

    assert youden(fitted, bundle.threshold) >= youden(fitted, trained_bundle.threshold)
    assert report["n"] == len(y) == 80 and report["in_sample"] is True
    assert len(report["unreadable"]) == 1 and "IM-9999-0001.jpeg" in report["unreadable"][0]


def test_writes_a_loadable_bundle_with_the_same_weights(calibrated, trained_bundle):
    bundle, _ = calibrated
    reloaded = load_bundle(bundle.path)  # sha256 and metadata checks pass
    assert reloaded.config["weights_sha256"] == trained_bundle.config["weights_sha256"]
    assert reloaded.threshold == pytest.approx(bundle.threshold)
    assert reloaded.config["calibration"]["source_threshold"] == trained_bundle.threshold
    assert json.loads((trained_bundle.path / "config.json").read_text())["threshold"] == trained_bundle.threshold
    assert reloaded.operating_point_source.startswith("80 labelled images of ")
    assert set(reloaded.metrics) == {"calibration"}  # the source's validation numbers no longer describe it
    card = (bundle.path / "MODEL_CARD.md").read_text()
    assert "pneumoscan calibrate" in card and "in-sample" in card
    assert Classifier.load(bundle.path).threshold == pytest.approx(bundle.threshold)


def test_target_sensitivity_is_reached_in_sample(trained_bundle, local_set, tmp_path):
    bundle, report = calibrate_bundle(
        local_set, tmp_path / "m", trained_bundle.path, target_sensitivity=0.95, n_resamples=100, progress=False
    )
    assert report["sensitivity"] >= 0.95
    assert bundle.config["threshold_rule"] == "sensitivity>=0.95"


def test_onnx_probabilities_follow_the_new_temperature(calibrated, trained_bundle, local_set):
    """The ONNX export bakes the temperature in, so a recalibrated bundle must not reuse the source's export."""
    from pneumoscan.inference import cached_onnx

    bundle, _ = calibrated
    source_onnx, new_onnx = cached_onnx(trained_bundle), cached_onnx(bundle)
    assert source_onnx != new_onnx
    import onnxruntime as ort

    images, _, _ = load_images(load_split(local_set)[:4], bundle.image_size, progress=False)
    logit, probability = ort.InferenceSession(str(new_onnx)).run(None, {"image": images[:, None]})
    assert np.allclose(probability, bundle.probabilities(logit), atol=1e-5)


def test_stale_onnx_files_are_removed_and_the_source_is_protected(trained_bundle, local_set, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"old export with another temperature")
    calibrate_bundle(local_set, out, trained_bundle.path, n_resamples=50, progress=False)
    assert not (out / "model.onnx").exists()
    with pytest.raises(ConfigError, match="new folder"):
        calibrate_bundle(local_set, trained_bundle.path, trained_bundle.path, progress=False)


def test_one_class_is_refused(trained_bundle, local_set, tmp_path):
    one_class = tmp_path / "one"
    shutil.copytree(local_set / "PNEUMONIA", one_class / "PNEUMONIA", symlinks=True)
    (one_class / "NORMAL").mkdir()
    (one_class / "NORMAL" / "IM-0000-0000.jpeg").write_bytes(b"not an image")
    with pytest.raises(ConfigError, match="both classes"):
        calibrate_bundle(one_class, tmp_path / "m", trained_bundle.path, progress=False)


def test_cli(trained_bundle, small_data, tmp_path, capsys):
    code = main(
        ["calibrate", "--data", str(small_data), "--split", "test", "--model", str(trained_bundle.path)]
        + ["--out", str(tmp_path / "m"), "--bootstrap", "100", "--quiet"]
    )
    captured = capsys.readouterr()
    assert code == 0
    assert f"threshold {trained_bundle.threshold:.4f} -> " in captured.out and "in-sample" in captured.out
    assert "only 40 NORMAL and 40 PNEUMONIA images" in captured.err  # 40 < 50 of each class
    assert load_bundle(tmp_path / "m").config["calibration"]["images"] == 80
