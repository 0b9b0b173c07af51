import json
import shutil

import numpy as np
import pytest

from pneumoscan import Classifier
from pneumoscan.cli.demo import EXAMPLES
from pneumoscan.cli.main import main
from pneumoscan.core import metrics as M
from pneumoscan.core.errors import ConfigError
from pneumoscan.io.dataset import load_images, load_split
from pneumoscan.model.store import load_bundle
from pneumoscan.training.calibrate import calibrate_bundle


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
    return calibrate_bundle(local_set, out, model=trained_bundle.path, rule="youden", n_resamples=200, progress=False)


def _labels_and_logits(bundle_path, folder):
    clf = Classifier.load(bundle_path)  # the engine calibrate uses: thresholds sit exactly on scores
    images, samples, _ = load_images(load_split(folder), clf.image_size, progress=False)
    return np.array([s.label for s in samples]), clf.logits(images)


def test_refits_temperature_and_youden_threshold_on_the_local_images(calibrated, trained_bundle, local_set):
    bundle, report = calibrated
    y, logits = _labels_and_logits(trained_bundle.path, local_set)
    t0 = trained_bundle.temperature
    assert bundle.temperature == pytest.approx(M.fit_temperature(y, logits, (t0 / 4, t0 * 4), t0), rel=1e-3)
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
    assert "fitted on 80 labelled images of " in reloaded.operating_point_source
    assert set(reloaded.metrics) == {"calibration"}  # the source's validation numbers no longer describe it
    card = (bundle.path / "MODEL_CARD.md").read_text()
    assert "pneumoscan calibrate" in card and "in-sample" in card
    assert Classifier.load(bundle.path).threshold == pytest.approx(bundle.threshold)


def test_target_sensitivity_is_reached_in_sample(trained_bundle, local_set, tmp_path):
    bundle, report = calibrate_bundle(
        local_set, tmp_path / "m", model=trained_bundle.path, target_sensitivity=0.95, n_resamples=100, progress=False
    )
    assert report["sensitivity"] >= 0.95
    assert bundle.config["threshold_rule"] == "sensitivity>=0.95"


def test_calibrated_bundle_keeps_its_onnx_models(exported_bundle, local_set, tmp_path):
    """ONNX exports hold logits only: a recalibrated bundle keeps them (int8 included), with the new
    operating point in their metadata, and shares the fp32 cache with its source."""
    from pneumoscan.inference.engines import onnx_cache_path

    bundle, _ = calibrate_bundle(local_set, tmp_path / "m", model=exported_bundle.path, n_resamples=50, progress=False)
    assert {"model.onnx", "model.int8.onnx", "gate.safetensors"} <= set(bundle.config["files"])
    assert onnx_cache_path(bundle) == onnx_cache_path(exported_bundle)
    files = [p for p in sorted(local_set.rglob("*.jpeg"))[:6]]
    source = Classifier.load(exported_bundle.path, int8=True)
    calibrated = Classifier.load(bundle.path, int8=True, gate=False)  # the small bundle's gate refuses a few films
    images, _, _ = load_images(load_split(local_set)[:6], bundle.image_size, progress=False)
    assert np.allclose(source.logits(images), calibrated.logits(images))
    got = calibrated.predict(files)
    assert all(r.ok and r.threshold == pytest.approx(bundle.threshold) for r in got)
    import onnxruntime as ort

    meta = ort.InferenceSession(str(bundle.path / "model.int8.onnx")).get_modelmeta().custom_metadata_map
    assert float(meta["pneumoscan_temperature"]) == pytest.approx(bundle.temperature)


def test_unrecorded_onnx_files_are_ignored_and_the_source_is_protected(trained_bundle, local_set, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"old export, recorded nowhere")
    with pytest.warns(UserWarning, match="not recorded"):
        bundle, _ = calibrate_bundle(local_set, out, model=trained_bundle.path, n_resamples=50, progress=False)
        reloaded = load_bundle(out)
    assert bundle.onnx_path() is None and reloaded.onnx_path() is None and "files" in reloaded.config
    with pytest.raises(ConfigError, match="new folder"):
        calibrate_bundle(local_set, trained_bundle.path, model=trained_bundle.path, progress=False)


def test_one_class_is_refused(trained_bundle, local_set, tmp_path):
    one_class = tmp_path / "one"
    shutil.copytree(local_set / "PNEUMONIA", one_class / "PNEUMONIA", symlinks=True)
    (one_class / "NORMAL").mkdir()
    (one_class / "NORMAL" / "IM-0000-0000.jpeg").write_bytes(b"not an image")
    with pytest.raises(ConfigError, match="both classes"):
        calibrate_bundle(one_class, tmp_path / "m", model=trained_bundle.path, progress=False)


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


@pytest.mark.parametrize(
    "rule, target", [("youden", None), ("balanced", None), ("youden", 1.0)], ids=["youden", "balanced", "sens1"]
)
def test_small_separable_set_gives_a_sound_bundle(rule, target, tmp_path):
    """The 16 bundled examples, which the default model separates perfectly: no temperature can be fitted
    (the loss falls as T goes to 0), so the bundle's is kept, with a warning; the threshold is a probability."""
    source = load_bundle()
    bundle, report = calibrate_bundle(
        EXAMPLES, tmp_path / "m", rule=rule, target_sensitivity=target, n_resamples=50, progress=False
    )
    assert bundle.temperature == source.temperature
    assert 0.01 <= bundle.threshold <= 0.99
    assert any("separates these 16 images perfectly" in w for w in report["warnings"])
    assert report["accuracy"] == 1.0  # in-sample: a youden threshold in the gap, or at the lowest positive
    reloaded = load_bundle(tmp_path / "m")
    assert reloaded.threshold == bundle.threshold and reloaded.metrics["calibration"]["warnings"] == report["warnings"]
    if rule == "youden" and target is None:
        y, logits = _labels_and_logits(None, EXAMPLES)
        between = M.sigmoid((logits[y == 1].min() + logits[y == 0].max()) / 2, source.temperature)
        assert bundle.threshold == pytest.approx(float(between))


def test_cli_on_the_bundled_examples_warns_and_writes(tmp_path, capsys):
    code = main(["calibrate", "--data", str(EXAMPLES), "--out", str(tmp_path / "m"), "--bootstrap", "50", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0 and "calibrated bundle written" in captured.out
    assert "pneumoscan: warning: the model separates these 16 images perfectly" in captured.err
    assert "only 8 NORMAL and 8 PNEUMONIA images" in captured.err


def test_a_failed_calibration_leaves_no_empty_folder(tmp_path):
    one_class = tmp_path / "one"
    shutil.copytree(EXAMPLES / "NORMAL", one_class / "NORMAL")
    (one_class / "PNEUMONIA").mkdir()
    (one_class / "PNEUMONIA" / "person1_bacteria_1.jpeg").write_bytes(b"not an image")
    assert main(["calibrate", "--data", str(one_class), "--out", str(tmp_path / "new" / "m"), "--quiet"]) == 2
    assert not (tmp_path / "new" / "m").exists()
    kept = tmp_path / "kept"
    kept.mkdir()  # a folder the user made is theirs: left as it was
    assert main(["calibrate", "--data", str(one_class), "--out", str(kept), "--quiet"]) == 2
    assert kept.is_dir() and not any(kept.iterdir())


def test_a_calibrated_bundle_has_its_own_name_and_version_and_records_its_source(tmp_path):
    """A comparison of a model and its calibrated copy tells them apart by name, not only by path."""
    import time

    from pneumoscan.core.text import markdown_text
    from pneumoscan.model.store import resolve_model

    source = load_bundle(resolve_model("fast"))
    bundle, _ = calibrate_bundle(EXAMPLES, tmp_path / "m", model="fast", n_resamples=20, progress=False)
    reloaded = load_bundle(tmp_path / "m")
    assert reloaded.name == f"{source.name}-calibrated-examples" == bundle.name
    assert reloaded.config["version"] == f"{time.strftime('%Y.%m.%d')} (from {source.config['version']})"
    site = reloaded.config["calibration"]
    assert site["source"] == source.name and site["source_version"] == source.config["version"]
    assert site["source_weights_sha256"] == source.weights_sha256 and site["source_path"] == str(source.path)
    card = (tmp_path / "m" / "MODEL_CARD.md").read_text()
    assert f"its source, {markdown_text(source.name)} version {source.config['version']}" in card
    again, _ = calibrate_bundle(EXAMPLES, tmp_path / "m2", model=tmp_path / "m", n_resamples=20, progress=False)
    assert again.name == reloaded.name  # recalibrated: still named after the original, not -calibrated- twice
