"""Site calibration: refit a bundle's temperature and operating threshold on local labelled images.

A bundle's threshold and temperature were fitted on validation patients from the training hospital.
Under a shift of patients, period or scanner they need not hold: on the official test split the
bundled model's Youden threshold from validation trades specificity for sensitivity. With labelled
images from where a model will run, :func:`calibrate_bundle` writes a copy of the bundle with both
refitted there. The weights are copied unchanged (same sha256), so AUC is unchanged; the metrics it
records are in-sample and say so. Evaluate on other images before trusting the new operating point.
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import numpy as np

from pneumoscan.core import metrics as M
from pneumoscan.core.errors import ConfigError
from pneumoscan.core.options import CalibrateOptions
from pneumoscan.core.settings import DECLARED, checked_path, declared
from pneumoscan.inference.classifier import Classifier
from pneumoscan.io.dataset import load_images, load_split
from pneumoscan.io.fileio import ensure_folder
from pneumoscan.model.bundle import Bundle

FEW_PER_CLASS = 50  # below this many images of either class, say the fit is unreliable
TEMPERATURE_SPREAD = 4.0  # a site's temperature stays within the source's divided or multiplied by this


def small_set_warning(report: dict) -> str | None:
    """A one-line warning when the calibration set is too small to fit a threshold on."""
    fewest = min(report["n_normal"], report["n_pneumonia"])
    if fewest >= FEW_PER_CLASS:
        return None
    return (
        f"warning: only {report['n_normal']} NORMAL and {report['n_pneumonia']} PNEUMONIA images; a threshold "
        f"fitted on fewer than {FEW_PER_CLASS} of each class is unreliable (see the intervals)"
    )


def require_signal(data, y: np.ndarray, logits: np.ndarray) -> None:
    """Refuse a calibration set whose labels the model's scores do not follow: swapped class folders, the same
    films in both, or too few to tell (the 95% DeLong interval of the AUC reaches 0.5 or lies below it).
    A temperature and threshold fitted there would call every film one class."""
    interval = M.auc_interval(y, logits)
    if interval is None:
        raise ConfigError(f"{data}: calibration needs at least 2 readable images of each class")
    auc, low, high = interval
    if low > 0.5:
        return
    if high < 0.5:
        why = "below chance: are the NORMAL and PNEUMONIA folders swapped?"
    else:
        why = "not above chance: the labels carry no signal the model follows (the same films in both classes?)"
    raise ConfigError(
        f"{data}: refused: the model's AUC on these labels is {auc:.3f} (95% CI {low:.3f}-{high:.3f}), {why}"
    )


@declared(CalibrateOptions, "data", "out", "model", "split", "rule", "target_sensitivity", "n_resamples", "progress")
def calibrate_bundle(
    data: str | Path,
    out: str | Path,
    *,
    model: str | Path | None = DECLARED,
    split: str | None = DECLARED,
    rule: str = DECLARED,
    target_sensitivity: float | None = DECLARED,
    n_resamples: int = DECLARED,
    seed: int = 0,
    progress: bool = DECLARED,
) -> tuple[Bundle, dict]:
    """Fit temperature and threshold (by ``rule``, see :func:`metrics.fit_operating_point`) on
    the labelled images of ``data`` (``split`` of a Kaggle layout, or a flat NORMAL/PNEUMONIA folder)
    and write the recalibrated bundle to ``out``. Returns it with its in-sample report, whose ``warnings``
    say where a value was bounded or kept (a small or perfectly separated set: see
    :func:`metrics.operating_point`). A failed calibration leaves no folder it created."""
    clf = Classifier.load(model)  # the bundle's default engine: the operating point sits on what predict runs
    source = clf.bundle
    out = checked_path(out, "output folder")
    if out.resolve() == source.path.resolve():
        raise ConfigError(f"{out}: write the calibrated bundle to a new folder, not over its source")
    created = not out.exists()
    ensure_folder(out)  # before any work
    try:
        return _calibrate(clf, data, out, split, rule, target_sensitivity, n_resamples, seed, progress)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a failed calibration leaves no empty folder behind
        raise


def calibrated_identity(
    source: Bundle, data: str | Path, split: str | None, when: float | None = None, kind: str = "calibrated"
) -> dict:
    """The name and version of a bundle calibrated (or, with ``kind``, adapted) from ``source`` on ``data``: the
    source's name with ``-calibrated-<site>`` (the data folder's name; with a split, ``<folder>-<split>``) and
    the date, so such a bundle never passes for its source. Within the bundle limit of 200 characters each."""
    folder = Path(data).resolve().name or "site"
    site = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{folder}-{split}" if split else folder).strip("-") or "site"
    base = re.sub(f"-{kind}-.*$", "", source.name)  # a recalibrated bundle names its original source
    name = f"{base[:120]}-{kind}-{site[:60]}"
    version = time.strftime("%Y.%m.%d", time.localtime(when))
    source_version = str(source.config.get("version", "")).strip()
    return {"name": name, "version": f"{version} (from {source_version[:60]})" if source_version else version}


def _calibrate(clf, data, out: Path, split, rule, target_sensitivity, n_resamples, seed, progress):
    from pneumoscan.evaluation.evaluate import score

    source = clf.bundle
    images, samples, errors = load_images(load_split(data, split), clf.bundle.preprocessing, progress, "loading")
    y = np.array([s.label for s in samples])
    if len(set(y.tolist())) < 2:
        raise ConfigError(f"{data}: calibration needs readable images of both classes")
    logits = clf.logits(images)
    require_signal(data, y, logits)
    fitted = M.operating_point(
        y, logits, rule, target_sensitivity, prior_temperature=source.temperature, spread=TEMPERATURE_SPREAD
    )
    config = {
        **source.config,
        **calibrated_identity(source, data, split),
        "threshold": fitted.threshold,
        "temperature": fitted.temperature,
        "threshold_rule": fitted.rule,
        "calibration": {
            "source": source.name,
            "source_version": str(source.config.get("version", "")),
            "source_path": str(source.path),
            "source_weights_sha256": source.weights_sha256,
            "source_threshold": source.threshold,
            "source_temperature": source.temperature,
            "data": str(Path(data) / split if split else data),
            "images": len(y),
            "patients": len({s.patient for s in samples}),
        },
    }
    bundle = dataclasses.replace(source, path=out, config=config, metrics={})  # a single bundle or an ensemble
    report = score(
        samples, logits, bundle, engine=clf.engine.name, split="calibration", n_resamples=n_resamples, seed=seed
    )
    report.update(in_sample=True, unreadable=errors, warnings=fitted.warnings)
    metrics = {"calibration": {k: v for k, v in report.items() if k != "model"}}
    # ONNX models hold logits only, so they stay valid (the writer puts the new operating point in their
    # metadata); the input gate and the subtype head do not depend on the operating point either.
    return source.write_copy(out, config, metrics), report  # ONNX models, gate and heads carried over
