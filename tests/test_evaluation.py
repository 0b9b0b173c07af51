import csv
import html
import json
import shutil
from pathlib import Path

import pytest

from pneumoscan import Classifier

KEYS = {
    "split",
    "n",
    "n_normal",
    "n_pneumonia",
    "loss",
    "accuracy",
    "auc",
    "sensitivity",
    "specificity",
    "precision",
    "f1",
    "threshold",
    "confusion_matrix",
    "classification_report",
    "ci95",
    "ece",
}


@pytest.fixture(scope="module")
def evaluated(trained_bundle, small_data, tmp_path_factory):
    from pneumoscan.evaluation.evaluate import evaluate

    out = tmp_path_factory.mktemp("eval")
    return out, evaluate(
        small_data, "test", [str(trained_bundle.path)], out, engine="torch", n_resamples=300, progress=False
    )


def test_metrics_json_has_the_contract_keys(evaluated):
    out, _ = evaluated
    report = json.loads((out / "metrics.json").read_text())
    assert KEYS <= set(report)
    assert report["n"] == report["n_normal"] + report["n_pneumonia"] == 80
    (tn, fp), (fn, tp) = report["confusion_matrix"]
    assert tn + fp == report["n_normal"] and fn + tp == report["n_pneumonia"]
    assert report["accuracy"] == pytest.approx((tn + tp) / 80)
    assert report["at_0.5"]["threshold"] == 0.5
    assert report["calibration"]["ece_before"] >= 0 and report["ece"] == report["calibration"]["ece_after"]
    for key in ("auc", "accuracy", "sensitivity", "specificity", "precision", "f1"):
        low, high = report["ci95"][key]
        assert low <= report[key] <= high


def test_console_table_shows_0_5_as_a_second_column_only_when_it_is_another_threshold(evaluated):
    from pneumoscan.evaluation.evaluate import metrics_table

    out, _ = evaluated
    report = json.loads((out / "metrics.json").read_text())
    at_half = {**report["at_0.5"], **{k: report[k] for k in ("model", "split", "patients", "calibration")}}
    header = [line for line in metrics_table(at_half).splitlines() if line.startswith("metric")]
    assert header[0].split() == ["metric", "at", "0.500", "(95%", "CI)"]
    elsewhere = {**report, "threshold": 0.3}
    assert metrics_table(elsewhere).splitlines()[1].split()[1:] == [
        "at",
        "0.300",
        "(95%",
        "CI)",
        "at",
        "0.500",
        "(95%",
        "CI)",
    ]
    auc_row = next(line for line in metrics_table(elsewhere).splitlines() if line.startswith("auc "))
    assert len(auc_row.split()) == 5  # name, then value and interval in each column


def test_predictions_stay_with_their_files(evaluated, trained_bundle):
    """Each row's probability is what the model gives that file on its own, and its label is its folder's."""
    out, _ = evaluated
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    clf = Classifier.load(trained_bundle.path, engine="torch", gate=False)  # evaluate labels every image
    for row in rows[::9]:
        assert row["true_label"] in row["path"]
        assert float(row["probability"]) == pytest.approx(clf.predict_one(row["path"]).probability, abs=1e-5)


def test_figures_are_written(evaluated):
    out, summary = evaluated
    for name in (
        "roc.png",
        "precision_recall.png",
        "reliability.png",
        "confusion_matrix.png",
        "probabilities.png",
        "random_predictions.png",
    ):
        assert (out / name).stat().st_size > 5000, name


@pytest.mark.browser
def test_report_opens_in_a_real_browser(evaluated, tmp_path):
    """Headless Chromium (Debian's) loads report.html offline: every figure decodes and the table is there."""
    from playwright.sync_api import sync_playwright

    out, summary = evaluated
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone
        page.route(
            "**/*",
            lambda route: route.abort() if not route.request.url.startswith(("file:", "data:")) else route.continue_(),
        )
        page.goto((out / "report.html").as_uri())
        sizes = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth])")
        assert len(sizes) >= 8 and all(done and width > 100 for done, width in sizes)
        table = page.inner_text("#metrics")
        assert "Reference MobileNetV2" in table and "Kermany" in table and "AUC" in table
        page.screenshot(path=str(tmp_path / "report.png"), full_page=False)
        browser.close()


def test_comparing_two_models(trained_bundle, exported_bundle, small_data, tmp_path):
    from pneumoscan.evaluation.evaluate import evaluate

    summary = evaluate(
        small_data,
        "test",
        [str(trained_bundle.path), str(exported_bundle.path)],
        tmp_path,
        engine="torch",
        n_resamples=100,
        progress=False,
    )
    c = summary["comparison"]
    assert c["n"] == 80 and c["difference"] == pytest.approx(0, abs=1e-9)  # the same weights
    assert (tmp_path / "model_a" / "metrics.json").is_file() and (tmp_path / "model_b" / "metrics.json").is_file()
    assert json.loads((tmp_path / "comparison.json").read_text())["method"].startswith("DeLong")


def test_record_stores_the_report_in_the_bundle(trained_bundle, small_data, tmp_path):
    from pneumoscan.evaluation.evaluate import evaluate
    from pneumoscan.model.store import load_bundle

    copy = shutil.copytree(trained_bundle.path, tmp_path / "model")
    evaluate(
        small_data, "test", [str(copy)], tmp_path / "eval", engine="torch", n_resamples=50, progress=False, record=True
    )
    bundle = load_bundle(copy)  # weights untouched: the sha256 still matches
    assert bundle.metrics["test"]["n"] == 80 and "validation" in bundle.metrics
    assert "| test (80 images" in (copy / "MODEL_CARD.md").read_text()


def test_cross_fitted_local_calibration(trained_bundle, small_data, tmp_path):
    """`--cross-fit K`: pooled out-of-fold predictions reported beside the plain ones, in metrics.json,
    the console table and report.html."""
    import subprocess
    import sys

    out = tmp_path / "cf"
    done = subprocess.run(
        [sys.executable, "-m", "pneumoscan.cli", "evaluate", "--data", small_data, "--model", trained_bundle.path]
        + ["--out", out, "--cross-fit", "3", "--bootstrap", "100", "--quiet", "--ledger", tmp_path / "reads.csv"]
        + ["--operating-rule", "youden"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    cf = json.loads((out / "metrics.json").read_text())["cross_fit"]
    assert cf["n"] == 80 and cf["folds"] == 3 and len(cf["fold_thresholds"]) == 3 and cf["rule"] == "youden"
    (tn, fp), (fn, tp) = cf["confusion_matrix"]
    assert tn + fp + fn + tp == 80 and cf["accuracy"] == pytest.approx((tn + tp) / 80)
    assert cf["ci95"]["accuracy"][0] <= cf["accuracy"] <= cf["ci95"]["accuracy"][1]
    assert "cross-fitted local calibration (3 patient folds" in done.stdout
    assert "cross-fitted local calibration (3 folds" in (out / "report.html").read_text()
    import csv

    (row,) = list(csv.DictReader(open(tmp_path / "reads.csv")))
    assert row["weights_sha256"] == trained_bundle.config["weights_sha256"] and row["split"] == "test"
    assert float(row["auc"]) == pytest.approx(json.loads((out / "metrics.json").read_text())["auc"], abs=1e-4)


@pytest.fixture(scope="module")
def examples_evaluated(tmp_path_factory):
    """The bundled `fast` model on the 16 bundled examples (8 bacterial, no viral pneumonia): its subtype
    sensitivity, precision and F1 are undefined."""
    from pneumoscan.cli.demo import EXAMPLES
    from pneumoscan.evaluation.evaluate import evaluate

    out = tmp_path_factory.mktemp("examples-eval")
    return out, evaluate(EXAMPLES, None, ["fast"], out, n_resamples=200, progress=False)


def test_undefined_metrics_never_read_as_zero(examples_evaluated):
    from pneumoscan.evaluation.evaluate import metrics_table

    out, summary = examples_evaluated
    report = json.loads((out / "metrics.json").read_text())
    subtype = report["subtype"]
    assert subtype["n_viral"] == 0
    assert subtype["precision"] is None and subtype["f1"] is None and subtype["ci95"]["precision"] is None
    table = metrics_table(report)
    assert "sensitivity  undefined (no positive case)" in table and "0.000 (0.000-0.000)" not in table
    page = (out / "report.html").read_text()
    assert "0.000 <small>(0.000" not in page
    assert page.count("undefined <small>(no positive case)</small>") == 3  # the subtype's sensitivity, precision, F1
    # a reference that does not report a metric: a dash, not "undefined"
    mobilenet = page.split("Reference MobileNetV2 (seed, 150 px)</th>")[1].split("</tr>")[0]
    assert "undefined" not in mobilenet and "&mdash;" in mobilenet
    cal = report["calibration"]
    line = (
        f"temperature T = {cal['temperature']:.3f}, fitted to minimise log loss on the model's own validation "
        "(or site calibration) data, not on these images; on these images, without T (T = 1) and with it: "
        f"ECE {cal['ece_before']:.3f} and {cal['ece_after']:.3f}, log loss {cal['loss_before']:.3f} and "
        f"{cal['loss_after']:.3f}"
    )
    assert line in table and html.escape(line) in page and " before, " not in page + table


def test_undefined_reasons():
    from pneumoscan.core.metrics import binary_metrics, undefined_reason

    none_called = binary_metrics([0, 0, 1], [0.1, 0.2, 0.3], 0.5)  # no positive call
    assert none_called["precision"] is None and undefined_reason(none_called, "precision") == "none predicted positive"
    assert none_called["sensitivity"] == 0 and undefined_reason(none_called, "sensitivity") is None
    no_negative = binary_metrics([1, 1], [0.1, 0.9], 0.5)
    assert undefined_reason(no_negative, "specificity") == "no negative case"
    assert undefined_reason(no_negative, "auc") == "one class only"


@pytest.mark.browser
@pytest.mark.parametrize("width", [1280, 800])
def test_report_fits_the_window_without_scrolling_sideways(examples_evaluated, width, tmp_path):
    """At 1280 and 800 px the page does not scroll sideways and sensitivity and specificity are in view."""
    from playwright.sync_api import sync_playwright

    out, _ = examples_evaluated
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": width, "height": 900})
        page.goto((out / "report.html").as_uri())
        assert page.evaluate("() => document.documentElement.scrollWidth <= document.documentElement.clientWidth")
        for header in ("sensitivity", "specificity"):
            cell = page.locator("#metrics th", has_text=header).first
            box = cell.bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= width, (header, box)
            column = page.evaluate(
                "h => [...document.querySelectorAll('#metrics th')].findIndex(t => t.textContent === h)", header
            )
            overflow = page.evaluate(
                "i => [...document.querySelectorAll('#metrics tr')].slice(1).map(r => r.children[i])"
                ".filter(c => c.getBoundingClientRect().right > window.innerWidth || c.scrollWidth > c.clientWidth)"
                ".length",
                column,
            )
            assert overflow == 0, header
        page.locator("#metrics").scroll_into_view_if_needed()
        page.screenshot(path=str(tmp_path / "report.png"))
        browser.close()
    keep = Path("/tmp/page-shots")
    if keep.is_dir():
        (keep / f"report-{width}.png").write_bytes((tmp_path / "report.png").read_bytes())
