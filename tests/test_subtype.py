"""Bacterial or viral: parsing, the head, its outputs in every format, bundles with and without it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from pneumoscan.core import metrics as M
from pneumoscan.core.errors import ConfigError
from pneumoscan.io.dataset import subtype_of
from pneumoscan.model.heads.subtype import SubtypeHead


@pytest.mark.parametrize(
    "name,subtype",
    [
        ("person12_virus_3.jpeg", "viral"),
        ("person1_bacteria_10.jpeg", "bacterial"),
        ("PERSON5_VIRUS_1.PNG", "viral"),
        ("IM-0001-0001.jpeg", None),
        ("person7_unknown_1.jpeg", None),
        ("virus.jpeg", None),
    ],
)
def test_subtype_from_file_names(name, subtype):
    assert subtype_of(name) == subtype


def test_subtype_report_by_hand():
    y = np.array([0, 0, 0, 1, 1])  # viral is 1
    p = np.array([0.1, 0.4, 0.7, 0.6, 0.9])
    r = M.subtype_report(y, p, ["a", "b", "c", "d", "e"], 0.5, n_resamples=50)
    assert (r["n_bacterial"], r["n_viral"], r["positive"]) == (3, 2, "viral")
    assert r["confusion_matrix"] == [[2, 1], [0, 2]] and r["accuracy"] == pytest.approx(0.8)
    assert r["sensitivity"] == 1.0 and r["specificity"] == pytest.approx(2 / 3)
    assert set(r["classification_report"]) >= {"bacterial", "viral"}


def test_head_learns_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)

    def make(n):
        y = rng.integers(0, 2, n)
        return (rng.normal(3, 1, (n, 32)) + y[:, None] * np.linspace(0, 1.5, 32)) ** 2, y

    (x, y), (xv, yv) = make(600), make(200)
    head = SubtypeHead.fit(x, y, xv, yv)
    xt, yt = make(300)
    assert M.roc_auc(yt, head.viral_probability(xt)) > 0.9 and head.threshold == 0.5
    (tmp_path / "s.safetensors").write_bytes(head.to_bytes())
    again = SubtypeHead.load(tmp_path / "s.safetensors", n_features=32)
    assert np.allclose(again.viral_probability(xt), head.viral_probability(xt), atol=1e-5)
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="not a readable subtype head"):
        SubtypeHead.load(tmp_path / "bad.safetensors")


@pytest.mark.data
def test_splits_carry_subtypes_and_data_check_counts_them(small_data):
    from pneumoscan.io.dataset import check_dataset, load_split

    train = load_split(small_data, "train")
    assert all(s.subtype is None for s in train if s.label == 0)
    assert {s.subtype for s in train if s.label == 1} == {"bacterial", "viral"}
    lines = check_dataset(small_data, progress=False).lines()
    assert any(line.startswith("PNEUMONIA subtypes in train: bacterial") for line in lines)


@pytest.mark.data
def test_subtype_in_every_output_and_in_evaluate(trained_bundle, small_data, tmp_path):
    import csv
    import io

    from pneumoscan import Classifier
    from pneumoscan.evaluation.evaluate import evaluate

    assert "subtype.safetensors" in trained_bundle.config["files"]
    assert "subtype" in trained_bundle.metrics["validation"]
    folder = small_data / "test" / "PNEUMONIA"
    cmd = [sys.executable, "-m", "pneumoscan.cli", "predict", str(folder), "--model", str(trained_bundle.path)]
    rows = [
        json.loads(x)
        for x in subprocess.run(cmd + ["--format", "jsonl"], capture_output=True, text=True).stdout.splitlines()
    ]
    pneumonia = [r for r in rows if r.get("label") == "PNEUMONIA"]
    assert pneumonia and all(
        r["subtype"] in ("bacterial", "viral") and 0 <= r["viral_probability"] <= 1 for r in pneumonia
    )
    assert all("subtype" not in r for r in rows if r.get("label") == "NORMAL")
    table = subprocess.run(cmd, capture_output=True, text=True).stdout
    assert re.search(r"^PNEUMONIA +[\d.]+  (bacterial|viral) +[\d.]+  ", table, re.MULTILINE), table
    out = subprocess.run(cmd + ["--format", "csv"], capture_output=True, text=True).stdout
    assert {r["subtype"] for r in csv.DictReader(io.StringIO(out)) if r["label"] == "PNEUMONIA"} <= {
        "bacterial",
        "viral",
    }

    evaluate(small_data, "test", [str(trained_bundle.path)], tmp_path, n_resamples=50, progress=False)
    st = json.loads((tmp_path / "metrics.json").read_text())["subtype"]
    assert st["n"] == st["n_bacterial"] + st["n_viral"] == 40 and st["ci95"]["auc"]
    assert (tmp_path / "subtype_confusion.png").is_file() and "bacterial or viral" in (
        tmp_path / "report.html"
    ).read_text()

    # a bundle without the head behaves as before: no subtype anywhere
    from pneumoscan.model.bundle import write_bundle
    from pneumoscan.model.schema import WEIGHTS
    from pneumoscan.model.store import load_bundle

    copy = shutil.copytree(trained_bundle.path, tmp_path / "plain")
    bundle = load_bundle(copy)
    (copy / "subtype.safetensors").unlink()
    config = {**bundle.config, "files": {k: v for k, v in bundle.config["files"].items() if k != "subtype.safetensors"}}
    write_bundle(copy, config, bundle.metrics, weights=copy / WEIGHTS)
    plain = Classifier.load(copy)
    assert plain.subtype is None and all(r.subtype is None for r in plain.predict(sorted(folder.iterdir())[:5]))
