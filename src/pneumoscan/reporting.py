"""Figures (PNG) and texts (model card) made from predictions and metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import metrics as M

NORMAL_COLOUR, PNEUMONIA_COLOUR = "#2b83ba", "#d7191c"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_training_curves(history: list[dict], path: Path) -> Path | None:
    """Loss and AUC per epoch, training and validation, with the fine-tuning phase shaded."""
    if not history:
        return None
    plt = _pyplot()
    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, metric in zip(axes, ("loss", "auc")):
        for stage, style in (("train", "-o"), ("val", "-s")):
            values = [r.get(f"{stage}_{metric}") for r in history]
            ax.plot(epochs, values, style, label=f"{stage}", markersize=4)
        tuned = [r["epoch"] for r in history if r["phase"] == "fine_tune"]
        if tuned:
            ax.axvspan(min(tuned) - 0.5, max(tuned) + 0.5, color="0.9", label="fine-tuning")
        ax.set_xlabel("epoch")
        ax.set_title(metric.upper() if metric == "auc" else "loss (BCE)")
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def plot_confusion(cm: list[list[int]], path: Path) -> Path:
    """Counts and row-normalised confusion matrices side by side."""
    plt = _pyplot()
    counts = np.array(cm, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = counts / counts.sum(1, keepdims=True)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, values, title, fmt in ((axes[0], counts, "counts", "{:.0f}"), (axes[1], rates, "row-normalised", "{:.2f}")):
        ax.imshow(np.nan_to_num(values), cmap="Blues", vmin=0)
        for (i, j), v in np.ndenumerate(values):
            dark = np.nan_to_num(values[i, j]) > np.nan_to_num(values).max() / 2
            ax.text(
                j,
                i,
                fmt.format(v) if np.isfinite(v) else "-",
                ha="center",
                va="center",
                color="white" if dark else "black",
                fontsize=13,
            )
        ax.set_xticks([0, 1], ["NORMAL", "PNEUMONIA"])
        ax.set_yticks([0, 1], ["NORMAL", "PNEUMONIA"])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
    return _save(fig, path)


def plot_probability_distribution(y, p, threshold: float, path: Path) -> Path:
    plt = _pyplot()
    y, p = np.asarray(y), np.asarray(p)
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    bins = np.linspace(0, 1, 41)
    for label, name, colour in ((0, "NORMAL", NORMAL_COLOUR), (1, "PNEUMONIA", PNEUMONIA_COLOUR)):
        ax.hist(p[y == label], bins=bins, alpha=0.6, color=colour, label=f"true {name} ({(y == label).sum()})")
    ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:.3f}")
    ax.set_xlabel("predicted probability of PNEUMONIA")
    ax.set_ylabel("images")
    ax.legend()
    return _save(fig, path)


def _roc_points(y, p):
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(y, p)
    return fpr, tpr


def plot_roc(y, p, threshold: float, path: Path) -> Path:
    plt = _pyplot()
    fpr, tpr = _roc_points(y, p)
    cm = M.confusion_matrix(y, p, threshold)
    (tn, fp), (fn, tp) = cm
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.plot(fpr, tpr, color=PNEUMONIA_COLOUR, label=f"AUC {M.roc_auc(y, p):.3f}")
    ax.plot([0, 1], [0, 1], color="0.7", linestyle=":")
    ax.plot(fp / max(fp + tn, 1), tp / max(tp + fn, 1), "ko", label=f"operating point (t={threshold:.3f})")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("ROC")
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_precision_recall(y, p, threshold: float, path: Path) -> Path:
    from sklearn.metrics import average_precision_score, precision_recall_curve

    plt = _pyplot()
    precision, recall, _ = precision_recall_curve(y, p)
    point = M.binary_metrics(y, p, threshold)
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.plot(recall, precision, color=PNEUMONIA_COLOUR, label=f"AP {average_precision_score(y, p):.3f}")
    ax.plot(point["sensitivity"], point["precision"] or 0, "ko", label=f"operating point (t={threshold:.3f})")
    ax.axhline(np.mean(y), color="0.7", linestyle=":", label="prevalence")
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision")
    ax.set_title("Precision-recall")
    ax.legend(loc="lower left")
    return _save(fig, path)


def plot_reliability(y, p_raw, p_cal, path: Path) -> Path:
    """Reliability diagram before and after temperature scaling."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.plot([0, 1], [0, 1], color="0.7", linestyle=":")
    for p, name, style in ((p_raw, "uncalibrated", "-o"), (p_cal, "temperature-scaled", "-s")):
        curve = M.reliability_curve(y, p)
        ax.plot(
            [c[0] for c in curve],
            [c[1] for c in curve],
            style,
            markersize=4,
            label=f"{name} (ECE {M.expected_calibration_error(y, p):.3f})",
        )
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("fraction PNEUMONIA")
    ax.set_title("Reliability (15 bins)")
    ax.legend(loc="upper left")
    return _save(fig, path)


def plot_image_grid(images, titles: list[str], colours: list[str], path: Path, columns: int = 4) -> Path | None:
    """Images (uint8 grey) with a coloured title each: green right, red wrong."""
    if len(images) == 0:
        return None
    plt = _pyplot()
    rows = int(np.ceil(len(images) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.9 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, title, colour in zip(axes.ravel(), images, titles, colours):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=8, color=colour)
    fig.tight_layout()
    return _save(fig, path)


def prediction_titles(samples, p, threshold: float) -> tuple[list[str], list[str]]:
    titles, colours = [], []
    for sample, prob in zip(samples, p):
        predicted = "PNEUMONIA" if prob >= threshold else "NORMAL"
        titles.append(f"{sample.path.name[:24]}\ntrue {sample.label_name} / pred {predicted}\np={prob:.3f}")
        colours.append("green" if predicted == sample.label_name else "red")
    return titles, colours


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _with_ci(report: dict, key: str) -> str:
    ci = (report.get("ci95") or {}).get(key)
    return _fmt(report.get(key)) + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")


def _calibration_advice(site: dict | None) -> str:
    if site:
        return "Threshold and temperature were refitted on labelled local images (see Model)."
    return (
        "Threshold and temperature come from validation patients of the training\n"
        "hospital only: before use elsewhere, refit them on labelled local images with `pneumoscan calibrate`, then\n"
        "evaluate on other local images."
    )


def model_card(bundle) -> str:
    """MODEL_CARD.md for a bundle, from its config and metrics."""
    c, metrics = bundle.config, bundle.metrics
    training = c.get("training", {})
    site = c.get("calibration")
    fitted_on = f"fitted on {bundle.operating_point_source}" + (
        f"\n  (its source, {site['source']}, had {site['source_threshold']:.4f} and {site['source_temperature']:.4f})"
        if site
        else ""
    )
    rows = []
    for split, label in (
        ("validation", "validation"),
        ("calibration", "calibration set (in-sample)"),
        ("test", "test"),
    ):
        r = metrics.get(split)
        if r:
            rows.append(
                f"| {label} ({r['n']} images, {r.get('patients', '?')} patients) | {_with_ci(r, 'auc')} | "
                f"{_with_ci(r, 'accuracy')} | {_with_ci(r, 'sensitivity')} | {_with_ci(r, 'specificity')} | "
                f"{_fmt(r.get('loss'))} | {_fmt(r.get('ece'))} |"
            )
    tr = training.get("train", {})
    cal = (metrics.get("test") or {}).get("calibration")
    calibration = (
        f"On test, temperature scaling changed ECE from {_fmt(cal['ece_before'])} to {_fmt(cal['ece_after'])} "
        f"and log loss from {_fmt(cal['loss_before'])} to {_fmt(cal['loss_after'])}."
        if cal
        else ""
    )
    notes = f"\n## How this model was chosen\n{c['notes']}\n" if c.get("notes") else ""
    return f"""# Model card: {c.get("name", bundle.path.name)}

**Research software, not a medical device.** It must not be used to diagnose, treat or triage patients.

## Model
- Backbone: `{c["backbone"]}` (ImageNet-pretrained), a dense head (128 units, ReLU,
  dropout {c.get("dropout", 0.2)}), one logit.
- Input: {c["image_size"]}x{c["image_size"]} grey image (aspect ratio squashed), replicated to 3 channels,
  ImageNet mean/std.
- Operating threshold {c["threshold"]:.4f} ({c.get("threshold_rule", "youden")}) and temperature {c["temperature"]:.4f}:
  both {fitted_on}.
- Weights sha256: `{c["weights_sha256"]}`.

## Intended use
Research on, and screening support for, pneumonia on paediatric anterior-posterior chest radiographs, with a
clinician reading every image. {_calibration_advice(site)}

## Training data
Kermany et al. 2018, "Identifying Medical Diagnoses and Treatable Diseases by Image-Based Deep Learning",
Cell 172(5):1122-1131; data on Mendeley Data (licence CC BY 4.0), the same as Kaggle's "Chest X-Ray Images (Pneumonia)".
Paediatric patients aged 1 to 5 at Guangzhou Women and Children's Medical Center, anterior-posterior views.
Trained on the official train split ({tr.get("images", "?")} images: {tr.get("n_normal", "?")} NORMAL,
{tr.get("n_pneumonia", "?")} PNEUMONIA, {tr.get("patients", "?")} patients), with validation patients held out
of train ({training.get("validation", {}).get("images", "?")} images).

## Metrics (threshold {c["threshold"]:.3f}; 95% intervals by patient bootstrap)
| split | AUC | accuracy | sensitivity | specificity | loss | ECE |
|---|---|---|---|---|---|---|
{chr(10).join(rows) if rows else "| (no metrics recorded) | | | | | | |"}

{calibration}
{notes}
## Known failure modes and limits
- Adults: trained only on children aged 1 to 5; adult anatomy and disease patterns differ.
- Other hospitals, scanners and processing: one centre's images; contrast, sharpness and burned-in markers
  are known shortcuts on this data, and performance elsewhere is unknown.
- Lateral or posterior-anterior views, cropped or rotated images, non-chest images: out of scope; the model
  still outputs a probability for them.
- Devices and lines (tubes, catheters, electrodes) and post-operative images are not represented.
- The test split's normal images are called pneumonia more often than validation predicts: expect lower
  specificity than on validation.
"""
