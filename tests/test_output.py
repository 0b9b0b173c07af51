"""What predict, evaluate and export write, on the shipped model and its 16 bundled example images."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path

import pytest

from pneumoscan.cli.main import main
from pneumoscan.inference.output import TABLE, write_predictions
from pneumoscan.inference.result import CSV_COLUMNS, FIELDS, Prediction, record
from pneumoscan.model.store import resolve_model
from pneumoscan.report.figures import short_name

EXAMPLES = Path(__file__).resolve().parents[1] / "src" / "pneumoscan" / "examples"
SHIPPED = resolve_model("default")
PNEUMONIA = sorted((EXAMPLES / "PNEUMONIA").glob("*.jpeg"))
FILMS = sorted(p for p in EXAMPLES.rglob("*") if p.suffix in (".jpeg", ".dcm"))  # 16 JPEGs and the CR DICOM


def _run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """The shipped model on the examples folder (a flat NORMAL/PNEUMONIA folder), as `evaluate` writes it."""
    from pneumoscan.evaluation.evaluate import evaluate

    out = tmp_path_factory.mktemp("eval")
    return out, evaluate(EXAMPLES, "test", None, out, n_resamples=50, progress=False)


def test_evaluation_predictions_csv_carries_the_whole_record(evaluated):
    out, _ = evaluated
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 16 and list(rows[0]) == [*CSV_COLUMNS, "patient", "true_label"]
    assert all(r["gate_score"] and float(r["gate_score"]) > 0 for r in rows)
    pneumonia = [r for r in rows if r["label"] == "PNEUMONIA"]
    assert pneumonia and all(r["subtype"] in ("bacterial", "viral") for r in pneumonia)
    assert all(0 <= float(r["viral_probability"]) <= 1 for r in pneumonia)
    assert all(r["subtype"] == "" and r["viral_probability"] == "" for r in rows if r["label"] == "NORMAL")


def test_a_flat_folder_is_not_called_a_split_and_0_5_is_one_row(evaluated):
    out, summary = evaluated
    assert summary["split"] == "examples" and not summary["is_split"]
    page = (out / "report.html").read_text()
    assert "folder examples" in page and "test split" not in page
    tables = page.split("<table")[1:]
    rows = [re.findall(r"<tr><th>([^<]*threshold[^<]*)</th>", table) for table in tables]
    assert [len(r) for r in rows if r] == [1, 1]  # one row per metrics table (the report splits them to fit)
    assert all("0.500" in r[0] for r in rows if r)  # the shipped threshold is 0.5: no second, identical row


def test_two_models_with_one_name_are_told_apart(tmp_path, capsys):
    copy = shutil.copytree(SHIPPED, tmp_path / "copy")
    code, out, err = _run(
        capsys, "evaluate", "--data", EXAMPLES, "--model", SHIPPED, "--model", copy, "--out", tmp_path / "ev",
        "--bootstrap", "50", "--quiet",
    )  # fmt: skip
    assert code == 0 and "predicting" not in err and "scoring" not in err  # --quiet: no bars, no steps
    names = re.findall(r"^(A: .*|B: .*) on examples:", out, re.MULTILINE)
    assert len(names) == 2 and names[0] != names[1] and str(copy) in names[1]
    assert re.search(r"AUC difference A - B \(A: .* minus B: .*\): 0\.0000", out)
    page = (tmp_path / "ev" / "report.html").read_text()
    assert "A is A: " in page and "B is B: " in page


def test_table_columns_align_and_subtype_has_its_own_column():
    results = [
        Prediction("a.jpeg", 0.98, "PNEUMONIA", 0.5, None, 2.1, 4.98, True, "bacterial", 0.12),
        Prediction("b.jpeg", 0.01, "NORMAL", 0.5, None, 1.9, 4.98, True),
        Prediction("c.jpeg", error="file is empty"),
    ]
    stream = io.StringIO()
    write_predictions(results, "table", stream)
    lines = stream.getvalue().splitlines()
    header = lines[0]
    assert header.split() == [h for h, _, _ in TABLE] + ["path"]
    ends = [header.index(h) + len(h) for h in ("probability", "p(viral)")]  # right-aligned numbers end there
    assert lines[1][ends[0] - 6 : ends[0]] == "0.9800" and lines[1][ends[1] - 4 : ends[1]] == "0.12"
    assert lines[1].index("bacterial") == header.index("subtype")
    assert all(line.index(f"{n}.jpeg") == header.index("path") for line, n in zip(lines[1:4], "abc"))
    assert "bacterial 0.12" not in lines[1]  # the viral probability is not printed beside "bacterial"


def test_one_record_behind_every_format():
    r = Prediction("a.jpeg", 0.98, "PNEUMONIA", 0.5, None, 2.1, 4.98, False, "viral", 0.7)
    assert r.to_dict() == record(r) and list(record(r)) == [f for f in FIELDS if f in record(r)]
    assert record(r)["gate"] == "off"
    assert set(CSV_COLUMNS) <= set(FIELDS)


def test_predict_prints_each_error_once_and_format_must_agree_with_output(tmp_path, capsys):
    bad = tmp_path / "bad.jpeg"
    bad.write_bytes(b"not an image")
    code, out, err = _run(capsys, "predict", PNEUMONIA[0], bad)
    assert code == 1 and out.count("bad.jpeg") == 1 and "bad.jpeg" not in err  # the table holds it
    code, out, err = _run(capsys, "predict", PNEUMONIA[0], bad, "--format", "jsonl")
    assert code == 1 and out.count("bad.jpeg") == 1 and err.count("bad.jpeg") == 1  # data on stdout, note on stderr
    code, _, err = _run(capsys, "predict", PNEUMONIA[0], "--format", "csv", "--output", tmp_path / "r.jsonl")
    assert code == 2 and "--format csv does not match --output" in err and not (tmp_path / "r.jsonl").exists()
    code, _, _ = _run(capsys, "predict", PNEUMONIA[0], "--format", "jsonl", "--output", tmp_path / "r.jsonl")
    assert code == 0 and json.loads((tmp_path / "r.jsonl").read_text().splitlines()[-1])["label"] == "PNEUMONIA"


def test_export_into_the_bundle_by_its_path_is_used(tmp_path, capsys):
    from pneumoscan.model.store import load_bundle

    bundle = shutil.copytree(SHIPPED, tmp_path / "model")
    code, _, err = _run(capsys, "export", "--model", bundle, "--out", bundle / "other.onnx")
    assert code == 2 and "inside the bundle only model.onnx is used" in err
    code, out, err = _run(capsys, "export", "--model", bundle, "--out", bundle / "model.onnx")
    assert code == 0, err
    assert "model.onnx" in load_bundle(bundle).config["files"] and "not recorded" not in err


def test_export_help_says_logits_not_sigmoid(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "logits" in text and "sigmoid" not in text


def test_grid_titles_keep_both_ends_of_a_long_name():
    assert short_name("IM-0001-0001.jpeg") == "IM-0001-0001.jpeg"
    long = short_name("person1946_bacteria_4874_and_more_words.jpeg")
    assert len(long) == 26 and long.startswith("person1946") and long.endswith("words.jpeg") and "…" in long


# --- results files: plain CSV / JSON lines, the settings beside them ------------------------------------------


def test_results_files_open_as_what_they_say_they_are(tmp_path, capsys):
    """pandas reads predict's CSV and JSON lines as they are, one row per input, from a file or stdout."""
    import pandas as pd

    for suffix in ("csv", "jsonl"):
        out = tmp_path / f"r.{suffix}"
        code, _, err = _run(capsys, "predict", EXAMPLES, "--model", SHIPPED, "--output", out)
        assert code == 0, err
        frame = pd.read_csv(out) if suffix == "csv" else pd.read_json(out, lines=True)
        assert sorted(frame["path"]) == [str(f) for f in FILMS], frame.head()
        assert set(frame["label"]) <= {"NORMAL", "PNEUMONIA"} and frame["probability"].between(0, 1).all()
        if suffix == "csv":
            assert tuple(frame.columns) == CSV_COLUMNS
        sidecar = json.loads((tmp_path / f"r.{suffix}.pneumoscan.json").read_text())
        assert sidecar["format"] == "pneumoscan-results/2" and sidecar["gate"] == "on"
        assert sidecar["weights_sha256"] == json.loads((SHIPPED / "config.json").read_text())["weights_sha256"]
        code, stdout, _ = _run(capsys, "predict", EXAMPLES, "--model", SHIPPED, "--format", suffix)
        frame = pd.read_csv(io.StringIO(stdout)) if suffix == "csv" else pd.read_json(io.StringIO(stdout), lines=True)
        assert code == 0 and sorted(frame["path"]) == [str(f) for f in FILMS]


def test_resume_reads_the_sidecar_and_refuses_without_it(tmp_path, capsys):
    out, sidecar = tmp_path / "r.csv", tmp_path / "r.csv.pneumoscan.json"
    code, _, err = _run(capsys, "predict", *PNEUMONIA[:2], "--model", SHIPPED, "--output", out)
    assert code == 0, err
    before = out.read_bytes()
    code, _, err = _run(capsys, "predict", *PNEUMONIA[:2], "--model", SHIPPED, "--output", out, "--resume", "--no-gate")
    assert code == 2 and "gate on" in err and len(err.strip().splitlines()) == 1 and out.read_bytes() == before
    code, stdout, err = _run(capsys, "predict", *PNEUMONIA[:3], "--model", SHIPPED, "--output", out, "--resume")
    assert code == 0 and "1 classified" in stdout and "2 already in the file" in stdout, stdout + err
    assert len(list(csv.DictReader(open(out, newline="")))) == 3
    after = out.read_bytes()
    sidecar.unlink()  # now nothing says pneumoscan wrote it, with which model
    code, _, err = _run(capsys, "predict", *PNEUMONIA, "--model", SHIPPED, "--output", out, "--resume")
    assert code == 2 and "not a results file written by pneumoscan" in err and "r.csv.pneumoscan.json" in err
    assert len(err.strip().splitlines()) == 1 and out.read_bytes() == after and not sidecar.exists()


def test_a_results_file_of_the_older_format_still_resumes(tmp_path, capsys):
    """pneumoscan-results/1 kept the settings on the first line; such a file is resumed in its own format."""
    from pneumoscan.inference.classifier import Classifier
    from pneumoscan.inference.output import LEGACY_FORMAT, results_settings

    settings = {**results_settings(Classifier.load(SHIPPED), True), "format": LEGACY_FORMAT}
    out = tmp_path / "old.jsonl"
    done = {"path": str(PNEUMONIA[0]), "probability": 0.9, "label": "PNEUMONIA", "threshold": 0.5}
    out.write_text(json.dumps({"pneumoscan": settings}) + "\n" + json.dumps(done) + "\n")
    code, stdout, err = _run(capsys, "predict", *PNEUMONIA[:2], "--model", SHIPPED, "--output", out, "--resume")
    assert code == 0 and "1 classified" in stdout and "1 already in the file" in stdout, stdout + err
    lines = out.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["path"] == str(PNEUMONIA[1])
    assert not (tmp_path / "old.jsonl.pneumoscan.json").exists()


def test_evaluate_shows_a_bar_over_the_images_it_predicts(tmp_path, capsys):
    """The prediction phase (the longest: about 105 s for the default on the test split) has its own bar,
    per image (--quiet silences it: test_two_models_with_one_name_are_told_apart)."""
    code, _, err = _run(
        capsys, "evaluate", "--data", EXAMPLES, "--model", SHIPPED, "--out", tmp_path / "ev", "--bootstrap", "20"
    )
    assert code == 0, err
    assert re.search(r"predicting: 100%[^\r\n]*\b16/16\b", err), err[-2000:]
    assert re.search(r"figures: 100%[^\r\n]*\b(\d+)/\1\b", err) and "scoring: metrics with 95% intervals" in err
