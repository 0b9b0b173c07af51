"""Figures (PNG) made from predictions, metrics and training history."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pneumoscan.core import metrics as M
from pneumoscan.core.labels import CLASSES, label_of
from pneumoscan.core.text import printable

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


def plot_confusion(cm: list[list[int]], path: Path, labels=CLASSES) -> Path:
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
        ax.set_xticks([0, 1], labels)
        ax.set_yticks([0, 1], labels)
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
        ax.set_title(title, fontsize=8, color=colour, parse_math=False)  # file names are not math
    fig.tight_layout()
    return _save(fig, path)


def short_name(name: str, width: int = 26) -> str:
    """A file name that fits above a grid image: whole if short, else its start and end around an ellipsis
    (the end keeps the number that tells files apart)."""
    text = printable(name)
    if len(text) <= width:
        return text
    keep = width - 1
    return f"{text[: keep - keep // 2]}…{text[-(keep // 2) :]}"


def prediction_titles(samples, p, threshold: float) -> tuple[list[str], list[str]]:
    titles, colours = [], []
    for sample, prob in zip(samples, p):
        predicted = label_of(prob, threshold)
        titles.append(f"{short_name(sample.path.name)}\ntrue {sample.label_name} / pred {predicted}\np={prob:.3f}")
        colours.append("green" if predicted == sample.label_name else "red")
    return titles, colours
