"""int8 is the default engine only where the bundle's int8 model was measured to answer as fp32 does."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import real_images

from pneumoscan.core.errors import ConfigError
from pneumoscan.inference.classifier import Classifier
from pneumoscan.model.quantization import MUST, int8_status
from pneumoscan.model.store import load_bundle, resolve_model

pytestmark = pytest.mark.data


def _copy_of_default(tmp_path):
    return shutil.copytree(resolve_model("default"), tmp_path / "model")


def _edit_config(folder, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def test_the_bundled_default_runs_int8_and_fp32_is_asked_for():
    assert Classifier.load().engine.name == "onnx-int8"
    assert Classifier.load(fp32=True).engine.name == "onnx"
    assert Classifier.load(engine="torch").engine.name == "torch"  # PyTorch is float: no int8 there
    with pytest.raises(ConfigError, match="exclude each other"):
        Classifier.load(int8=True, fp32=True)


def test_the_default_records_an_agreement_that_meets_the_must():
    record = load_bundle(None).config["int8"]
    assert record["films"] >= 500 and record["source"].startswith("validation patients")
    assert record["labels_agree"] >= MUST["labels_agree"] and record["mean_abs_dp"] <= MUST["mean_abs_dp"]
    assert abs(record["auc_int8"] - record["auc_fp32"]) <= MUST["auc_difference"]
    assert record["gate_verdicts_differ"] == 0


def test_the_shipped_int8_answers_as_fp32_on_real_films():
    """Measured here, not read from the record: 16 validation and 24 test films of both classes, and the
    full-resolution originals as hospitals send them."""
    files = real_images("val", "NORMAL", 8) + real_images("val", "PNEUMONIA", 8)
    files += real_images("test", "NORMAL", 12) + real_images("test", "PNEUMONIA", 12)
    files += sorted((real_images("val", "NORMAL", 1)[0].parents[3] / "val_fullres").rglob("*.jpeg"))[:8]
    fp32 = Classifier.load(fp32=True, gate=False).predict(files)
    int8 = Classifier.load(gate=False).predict(files)
    p32, p8 = (np.array([r.probability for r in rs]) for rs in (fp32, int8))
    assert np.mean(np.abs(p8 - p32)) < 0.01 and np.max(np.abs(p8 - p32)) < 0.08
    assert [r.label for r in fp32] == [r.label for r in int8]


@pytest.mark.parametrize(
    "change, why",
    [
        (lambda c: c.pop("int8"), "not measured"),
        (lambda c: c["int8"].update(sha256="0" * 64), "changed since it was measured"),
        (lambda c: c["int8"].update(labels_agree=0.97), "labels agree on 97.00%"),
        (lambda c: c["int8"].update(mean_abs_dp=0.02), "mean |dp| 0.0200"),
        (lambda c: c["int8"].update(auc_int8=c["int8"]["auc_fp32"] - 0.01), "AUC differs by -0.0100"),
        (lambda c: c["int8"].update(gate_verdicts_differ=2), "2 gate verdicts differ"),
    ],
)
def test_a_bundle_whose_int8_is_not_shown_to_agree_runs_fp32_and_says_why(tmp_path, change, why):
    folder = _copy_of_default(tmp_path)
    _edit_config(folder, change)
    runs_int8, reason = load_bundle(folder).int8_status()
    assert not runs_int8 and why in reason
    assert Classifier.load(folder).engine.name == "onnx"
    assert Classifier.load(folder, int8=True).engine.name == "onnx-int8"  # still there when asked for


@pytest.mark.parametrize(
    "bad", [{"sha256": "x"}, "yes", {"films": True}, {"gate_verdicts_differ": -1}, {"auc_int8": 1.5}, {"max_abs_dp": 0}]
)
def test_a_malformed_int8_record_is_refused_in_one_line(tmp_path, bad):
    folder = _copy_of_default(tmp_path)
    _edit_config(folder, lambda c: c.update(int8=bad if not isinstance(bad, dict) else {**c["int8"], **bad}))
    with pytest.raises(ConfigError, match="config.json 'int8"):
        load_bundle(folder)


def test_a_new_operating_point_keeps_the_measured_int8(tmp_path):
    """A recalibrated copy rewrites the ONNX files' metadata (same graphs): the record follows them."""
    source = load_bundle(None)
    copy = source.write_copy(tmp_path / "calibrated", {**source.config, "temperature": 1.5}, {})
    assert copy.config["files"]["model.int8.onnx"] != source.config["files"]["model.int8.onnx"]
    assert copy.int8_status()[0] and copy.config["int8"]["sha256"] == copy.config["files"]["model.int8.onnx"]


def test_export_measures_int8_on_the_validation_films_and_the_choice_follows(trained_bundle, small_data, tmp_path):
    from pneumoscan.model.onnx_export import export_onnx, quantize_int8
    from pneumoscan.training.export import record_int8_agreement, training_images

    bundle = load_bundle(shutil.copytree(trained_bundle.path, tmp_path / "model"))
    fp32 = export_onnx(bundle)
    quantize_int8(bundle, fp32, training_images(bundle, small_data, 64))
    assert "not measured" in load_bundle(bundle.path).int8_status()[1]
    record = record_int8_agreement(bundle, fp32, small_data)
    _, validation = bundle.training_splits(small_data)
    assert record["films"] == len(validation) > 0
    assert record["sha256"] == load_bundle(bundle.path).config["files"]["model.int8.onnx"]
    runs_int8, why = load_bundle(bundle.path).int8_status()  # a few validation films cannot show 99.5%
    assert record["films"] < MUST["films"] and not runs_int8 and f"measured on {record['films']} films" in why
    assert Classifier.load(bundle.path).engine.name == "onnx"
    agreeing = {"labels_agree": 1.0, "mean_abs_dp": 0.0, "max_abs_dp": 0.0, "auc_int8": record["auc_fp32"]}
    enough = {**record, **agreeing, "films": MUST["films"], "gate_verdicts_differ": 0}
    assert int8_status({**load_bundle(bundle.path).config, "int8": enough})[0]


def test_models_and_predict_say_which_engine_runs(tmp_path):
    run = [sys.executable, "-m", "pneumoscan.cli"]
    listing = subprocess.run([*run, "models"], capture_output=True, text=True, check=True).stdout
    assert "engine: int8 by default (int8 agrees with fp32 on 525 validation films" in listing
    film = real_images("val", "PNEUMONIA", 1)[0]
    for flags, engine in (([], "onnx-int8"), (["--fp32"], "onnx")):
        out = tmp_path / f"{engine}.csv"
        subprocess.run([*run, "predict", str(film), "--output", str(out), *flags], capture_output=True, check=True)
        assert json.loads(out.with_name(out.name + ".pneumoscan.json").read_text())["engine"] == engine
