"""``pneumoscan evaluate``: metrics with intervals, calibration, figures and report.html for a split.

Predictions are made in the order of the files and written next to them (``predictions.csv``),
so a metric can always be traced to the images it came from.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from pneumoscan.core import metrics as M
from pneumoscan.core.errors import ConfigError
from pneumoscan.core.options import EvaluateOptions
from pneumoscan.core.settings import DECLARED, checked_path, declared
from pneumoscan.core.text import csv_cell, number, printable, with_ci
from pneumoscan.inference.classifier import Classifier
from pneumoscan.inference.output import write_prediction_file
from pneumoscan.io.dataset import Sample, load_images, load_split, summarize
from pneumoscan.io.fileio import ensure_folder, write_json
from pneumoscan.model.bundle import Bundle
from pneumoscan.model.heads.base import Evaluation
from pneumoscan.model.heads.registry import HEADS
from pneumoscan.report import figures as R
from pneumoscan.report.html import calibration_line

REFERENCES = {
    "Reference MobileNetV2 (seed, 150 px)": {"auc": 0.9528, "accuracy": 0.8766, "loss": 0.2970},
    "Kermany et al. 2018 (Cell)": {"auc": 0.968, "accuracy": 0.928, "sensitivity": 0.932, "specificity": 0.901},
    "Kermany et al. 2018, bacterial or viral (viral positive)": {
        "auc": 0.940,
        "accuracy": 0.907,
        "sensitivity": 0.886,
        "specificity": 0.909,
    },
}


@dataclass
class ModelResult:
    name: str
    classifier: Classifier
    samples: list[Sample]
    logits: np.ndarray
    report: dict
    figures: dict[str, Path] = field(default_factory=dict)

    @property
    def probabilities(self) -> np.ndarray:
        return self.classifier.probabilities(self.logits)


@declared(EvaluateOptions, *(f.name for f in fields(EvaluateOptions)))
def evaluate(
    data: str | Path,
    split: str | None = DECLARED,
    models: list[str | None] | None = DECLARED,
    out: str | Path = DECLARED,
    *,
    engine: str = DECLARED,
    int8: bool = DECLARED,
    fp32: bool = DECLARED,
    n_resamples: int = DECLARED,
    seed: int = DECLARED,
    progress: bool = DECLARED,
    record: bool = DECLARED,
    cross_fit: int | None = DECLARED,
    rule: str = DECLARED,
    target_sensitivity: float | None = DECLARED,
    ledger: str | Path | None = DECLARED,
) -> dict:
    """Evaluate one model, or compare two, on one split; write metrics.json, figures and report.html.

    ``record`` also stores each model's report in its bundle (``metrics.json`` under the split's
    name) and rewrites its model card: how the final test numbers reach the bundle. ``cross_fit`` K
    adds the cross-fitted local calibration (see :func:`cross_fitted`) under ``cross_fit``. ``ledger``
    appends one row per model to that CSV file (the record of every read of a held-out split)."""
    from pneumoscan.report.html import write_report

    if models and len(models) > 2:
        raise ConfigError("--model may be given at most twice")
    if ledger:  # before any work: a ledger that cannot take the rows stops the run now, not after it
        ledger = check_ledger(ledger)
        commit = code_version()  # the code that runs, recorded when it starts
    out = ensure_folder(out)
    models = models or [None]
    all_samples = load_split(data, split)
    is_split = bool(split) and (Path(data) / split).is_dir()  # else a flat NORMAL/PNEUMONIA folder was given
    split_name = split if is_split else Path(data).name
    classifiers = [  # bad bundles stop before any work
        Classifier.load(model, engine=engine, int8=int8, fp32=fp32) for model in models
    ]
    images_by_size: dict = {}  # by preprocessing: models that prepare alike share the images
    results = []
    for index, clf in enumerate(classifiers):
        spec = clf.bundle.preprocessing
        if spec not in images_by_size:
            images_by_size[spec] = load_images(all_samples, spec, progress, f"loading {split_name}")
        images, samples, errors = images_by_size[spec]
        if not samples:
            raise ConfigError(f"{data}: none of the {len(all_samples)} images could be read (first: {errors[0]})")
        name = _display_name(classifiers, index)
        which = "" if len(models) == 1 else f" {name[0]}"
        logits, features = clf.outputs(images, progress=progress, desc=f"predicting{which}")
        _step(progress, f"scoring{which}: metrics with 95% intervals ({n_resamples} bootstrap resamples of patients)")
        folder = out if len(models) == 1 else ensure_folder(out / f"model_{chr(97 + index)}")
        report = score(
            samples, logits, clf.bundle, engine=clf.engine.name, split=split_name, n_resamples=n_resamples, seed=seed
        )
        report["unreadable"] = errors
        report["model"]["shown_as"] = name  # "A: ..." and "B: ..." when two are compared
        predictions = clf.results([str(s.path) for s in samples], logits, features, gating=False, images=images)
        report.update(head_reports(clf, Evaluation(samples, features, predictions, n_resamples, seed, split_name)))
        if cross_fit:
            report["cross_fit"] = cross_fitted(
                samples,
                logits,
                folds=cross_fit,
                rule=rule,
                target_sensitivity=target_sensitivity,
                split=split_name,
                n_resamples=n_resamples,
                seed=seed,
            )
        result = ModelResult(name, clf, samples, logits, report)
        result.figures = make_figures(result, images, folder, seed, split_name, progress)
        for name, head in clf.heads.items():
            if name in report:
                result.figures.update(head.figures(report[name], folder))
        write_prediction_file(folder / "predictions.csv", list(zip(predictions, samples)))
        write_json(folder / "metrics.json", report)
        if record:
            record_in_bundle(clf.bundle, split_name if is_split else "all", report)
        if ledger:
            append_to_ledger(ledger, clf.bundle, report, commit=commit)
        results.append(result)

    summary = {
        "split": split_name,
        "is_split": is_split,
        "data": summarize(results[0].samples),
        "models": [r.report for r in results],
    }
    if len(results) == 2:
        summary["comparison"] = compare(results[0], results[1], n_resamples, seed)
        write_json(out / "comparison.json", summary["comparison"])
    summary["report"] = str(write_report(out / "report.html", results, summary, REFERENCES))
    return summary


def record_in_bundle(bundle: Bundle, split: str, report: dict) -> None:
    """Store a report in the bundle's metrics (under the split's name); the card is regenerated."""
    recorded = {k: v for k, v in report.items() if k != "model"}
    metrics = {**bundle.metrics, split: {**recorded, "engine": report["model"]["engine"]}}
    updated = bundle.write_copy(bundle.path, bundle.config, metrics)
    bundle.config, bundle.metrics = updated.config, updated.metrics


LEDGER_COLUMNS = (
    "date", "commit", "weights_sha256", "model", "recipe", "split", "n", "threshold", "rule",
    "auc", "auc_ci95", "accuracy", "accuracy_ci95", "sensitivity", "specificity", "loss", "note",
)  # fmt: skip


def code_version() -> str:
    """The code that is running: this package's git commit (``-dirty`` when its files differ from it)
    when it runs from a checkout that tracks it, else ``pneumoscan VERSION`` (an installed release).
    Never the git HEAD of the current folder, which may be another repository."""
    import subprocess

    from pneumoscan.core.package import PACKAGE, __version__

    package = PACKAGE

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    if git("ls-files", "--error-unmatch", "__init__.py") is None:  # not tracked here: an installed copy
        return f"pneumoscan {__version__}"
    commit = git("rev-parse", "--short=12", "HEAD")
    if not commit:
        return f"pneumoscan {__version__}"
    return commit + ("-dirty" if git("status", "--porcelain", "--", ".") else "")


def check_ledger(path: str | Path) -> Path:
    """Before an evaluation: the ledger can be appended to, and is empty or a ledger (its header is
    :data:`LEDGER_COLUMNS`); one line saying why not. A file that did not exist is not left behind."""
    import csv

    path = checked_path(path, "--ledger")
    existed = path.exists()
    if existed and not path.is_file():
        raise ConfigError(f"{printable(path)}: --ledger must be a regular file")
    try:
        with open(path, "a+", newline="", encoding="utf-8", errors="replace") as f:
            f.seek(0)
            first = f.readline(64 * 1024)
    except OSError as exc:
        raise ConfigError(f"{printable(path)}: the ledger cannot be written ({exc.strerror or exc})") from None
    if not existed:
        path.unlink(missing_ok=True)
    if first.strip() and tuple(next(csv.reader([first]), [])) != LEDGER_COLUMNS:
        raise ConfigError(f"{printable(path)}: not a ledger of held-out reads (its header differs); rows not appended")
    return path


def append_to_ledger(path: str | Path, bundle: Bundle, report: dict, note: str = "", commit: str | None = None) -> None:
    """One row for one read of a split: when, which code (``commit``: :func:`code_version` when the run
    started) and weights, which recipe, what it gave."""
    import csv
    import datetime

    path = check_ledger(path)
    recipe = bundle.config.get("training", {}).get("recipe", {})
    ci = report.get("ci95") or {}

    def interval(key: str) -> str:
        return f"{ci[key][0]:.4f}-{ci[key][1]:.4f}" if ci.get(key) else ""

    row = {
        "date": datetime.date.today().isoformat(),
        "commit": commit or code_version(),
        "weights_sha256": bundle.weights_sha256,
        "model": bundle.name,
        "recipe": " ".join(f"{k}={v}" for k, v in recipe.items() if k not in ("data", "out")),
        "split": report["split"],
        "n": report["n"],
        "threshold": f"{report['threshold']:.4f}",
        "rule": bundle.config.get("threshold_rule", ""),
        "auc": number(report["auc"], 4),
        "auc_ci95": interval("auc"),
        "accuracy": number(report["accuracy"], 4),
        "accuracy_ci95": interval("accuracy"),
        "sensitivity": number(report["sensitivity"], 4),
        "specificity": number(report["specificity"], 4),
        "loss": number(report["loss"], 4),
        "note": "; ".join(filter(None, [f"engine {report['model']['engine']}", note])),
    }
    new = not path.is_file() or path.stat().st_size == 0
    with open(path, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=LEDGER_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({k: csv_cell(v) for k, v in row.items()})


def _step(progress: bool, text: str) -> None:
    """A named phase without a bar of its own, on stderr where progress is shown."""
    if progress:
        print(text, file=sys.stderr, flush=True)


def _display_name(classifiers: list[Classifier], index: int) -> str:
    """How a model is named in reports: its bundle's name; when two are compared, "A: name" and
    "B: name", with the bundle folder where both bundles carry the same name."""
    bundle = classifiers[index].bundle
    if len(classifiers) == 1:
        return bundle.name
    same = len({c.bundle.name for c in classifiers}) == 1
    return f"{chr(65 + index)}: {bundle.name}" + (f" ({bundle.path})" if same else "")


def score(
    samples: list[Sample],
    logits: np.ndarray,
    bundle: Bundle,
    *,
    engine: str,
    split: str,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict:
    """The metrics of one model on one split: at its operating threshold, at 0.5, and calibration."""
    y = np.array([s.label for s in samples])
    groups = [s.patient for s in samples]
    p_cal = bundle.probabilities(logits)
    p_raw = M.sigmoid(logits)
    report = M.full_report(y, p_cal, groups, bundle.threshold, n_resamples, seed, split)
    report["model"] = {
        "name": bundle.name,
        "path": str(bundle.path),
        "engine": engine,
        "backbone": bundle.backbone,
        "image_size": bundle.image_size,
        "threshold_rule": bundle.config.get("threshold_rule"),
        "temperature": bundle.temperature,
    }
    report["at_0.5"] = M.full_report(y, p_cal, groups, 0.5, n_resamples, seed, split)
    report["calibration"] = {
        "temperature": bundle.temperature,
        "ece_before": M.expected_calibration_error(y, p_raw),
        "ece_after": report["ece"],
        "loss_before": M.log_loss(y, p_raw),
        "loss_after": report["loss"],
    }
    return report


def head_reports(clf: Classifier, data: Evaluation) -> dict:
    """Each feature head's report on labelled images (metrics.json under its name), where it has one."""
    reports = {name: head.evaluate(data) for name, head in clf.heads.items()}
    return {name: report for name, report in reports.items() if report is not None}


def cross_fitted(
    samples: list[Sample],
    logits: np.ndarray,
    *,
    folds: int,
    rule: str,
    target_sensitivity: float | None,
    split: str,
    n_resamples: int,
    seed: int,
) -> dict:
    """What a hospital can expect after ``pneumoscan calibrate`` on its own labelled images, estimated on
    these images: patient folds, each scored with the temperature and threshold fitted on the others
    by calibrate's rule; the pooled predictions get the usual metrics and patient-bootstrap intervals."""
    y = np.array([s.label for s in samples])
    groups = [s.patient for s in samples]
    try:
        fit = M.cross_fit(y, logits, groups, folds, rule, target_sensitivity, seed)
    except ValueError as exc:
        raise ConfigError(f"--cross-fit {folds}: {exc}") from None
    report = M.full_report(y, fit["probability"], groups, fit["threshold"], n_resamples, seed, split)
    report.update(
        folds=folds,
        rule=rule if target_sensitivity is None else f"sensitivity>={target_sensitivity}",
        fold_thresholds=fit["thresholds"],
        fold_temperatures=fit["temperatures"],
        method="threshold and temperature fitted on the other patient folds (calibrate's rule), "
        "applied to each fold; metrics on the pooled predictions",
    )
    return report


def compare(a: ModelResult, b: ModelResult, n_resamples: int, seed: int) -> dict:
    """Paired AUC comparison on the images both models read."""
    common = sorted({s.path for s in a.samples} & {s.path for s in b.samples})
    pa = dict(zip((s.path for s in a.samples), a.probabilities))
    pb = dict(zip((s.path for s in b.samples), b.probabilities))
    labels = {s.path: s.label for s in a.samples}
    y = [labels[p] for p in common]
    result = M.delong_test(y, [pa[p] for p in common], [pb[p] for p in common])
    return {"a": a.name, "b": b.name, "n": len(common), "method": "DeLong (paired)", **result}


def make_figures(
    result: ModelResult, images: np.ndarray, folder: Path, seed: int, split: str, progress: bool = False
) -> dict[str, Path]:
    """The report's figures (a bar over them on stderr with ``progress``: they take tens of seconds)."""
    from tqdm import tqdm

    y = np.array([s.label for s in result.samples])
    p, t = result.probabilities, result.classifier.threshold
    p_raw = M.sigmoid(result.logits)
    plots = {}
    if len(set(y.tolist())) == 2:  # curves need both classes
        plots["ROC curve"] = lambda: R.plot_roc(y, p, t, folder / "roc.png")
        plots["Precision-recall"] = lambda: R.plot_precision_recall(y, p, t, folder / "precision_recall.png")
        plots["Reliability diagram"] = lambda: R.plot_reliability(y, p_raw, p, folder / "reliability.png")
    plots["Confusion matrix"] = lambda: R.plot_confusion(M.confusion_matrix(y, p, t), folder / "confusion_matrix.png")
    plots["Predicted probability by true class"] = lambda: R.plot_probability_distribution(
        y, p, t, folder / "probabilities.png"
    )
    pick = sorted(random.Random(seed).sample(range(len(y)), min(16, len(y))))
    plots[f"{len(pick)} random {split} images"] = lambda: _grid(result, images, pick, folder / "random_predictions.png")
    wrong_fp = [i for i in np.argsort(-p) if y[i] == 0 and p[i] >= t][:8]
    wrong_fn = [i for i in np.argsort(p) if y[i] == 1 and p[i] < t][:8]
    plots["Most confident false positives"] = lambda: _grid(result, images, wrong_fp, folder / "false_positives.png")
    plots["Most confident false negatives"] = lambda: _grid(result, images, wrong_fn, folder / "false_negatives.png")
    figures = {name: plot() for name, plot in tqdm(plots.items(), desc="figures", unit="fig", disable=not progress)}
    curves = result.classifier.bundle.path / "training_curves.png"
    if curves.is_file():
        figures["Training curves"] = curves
    return {k: v for k, v in figures.items() if v is not None}


def _grid(result: ModelResult, images: np.ndarray, indices, path: Path):
    if not len(indices):
        return None
    samples = [result.samples[i] for i in indices]
    titles, colours = R.prediction_titles(samples, result.probabilities[indices], result.classifier.threshold)
    return R.plot_image_grid(images[indices], titles, colours, path)


def metrics_table(report: dict) -> str:
    """A readable terminal table: each headline metric at the operating threshold, and at 0.5 where that
    is another threshold."""
    t = report
    reports = [t] if t["threshold"] == 0.5 else [t, report["at_0.5"]]
    heads = [f"at {r['threshold']:.3f} (95% CI)" for r in reports]
    lines = [
        f"{printable(report['model'].get('shown_as', report['model']['name']))} on {printable(report['split'])}: "
        f"{report['n']} images "
        f"({report['n_normal']} NORMAL, {report['n_pneumonia']} PNEUMONIA, {report['patients']} patients)",
        f"{'metric':<12} " + " ".join(f"{h:<28}" for h in heads),
    ]
    for key in M.CI_METRICS:
        lines.append(f"{key:<12} " + " ".join(f"{with_ci(r, key):<28}" for r in reports))
    (tn, fp), (fn, tp) = t["confusion_matrix"]
    cal = t["calibration"]
    lines.append(f"confusion at {t['threshold']:.3f}: TN {tn}  FP {fp}  FN {fn}  TP {tp}")
    lines.append(calibration_line(cal))
    for name, head in HEADS.items():
        if head_report := report.get(name):
            lines += head.report_lines(head_report, report["n"])
    if cf := report.get("cross_fit"):
        lines.append(
            f"cross-fitted local calibration ({cf['folds']} patient folds, {cf['rule']}; "
            f"fold thresholds {min(cf['fold_thresholds']):.3f}-{max(cf['fold_thresholds']):.3f}):"
        )
        for key in M.CI_METRICS:
            lines.append(f"{key:<12} {with_ci(cf, key):<28}")
    if report.get("unreadable"):
        lines.append(f"unreadable, skipped: {len(report['unreadable'])}")
        lines += [f"  {printable(e)}" for e in report["unreadable"]]
    return "\n".join(lines)
