"""Every number the project reports, in one place.

Labels are 0 (NORMAL) and 1 (PNEUMONIA, the positive class); scores are probabilities of
PNEUMONIA. Where a metric is undefined (AUC on a single class, precision with no positive
call, precision and F1 with no positive case) it is ``None`` in results, never a crash and never a made-up number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from pneumoscan.core.labels import CLASSES

EPS = 1e-7
CI_METRICS = ("auc", "accuracy", "sensitivity", "specificity", "precision", "f1", "loss")  # with intervals
HEADLINE = ("auc", "accuracy", "sensitivity", "specificity")  # what pages and summaries show first


def sigmoid(logits, temperature: float = 1.0) -> np.ndarray:
    """Probabilities of PNEUMONIA from logits divided by ``temperature`` (temperature scaling);
    computed without overflow for logits of any size."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    return np.exp(-np.logaddexp(0.0, -z))


def _arrays(y, p) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.int64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels and scores differ in length: {y.size} vs {p.size}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (NORMAL) or 1 (PNEUMONIA)")
    return y, p


def _none_if_nan(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def weighted_auc(y, p, weights: np.ndarray | None = None) -> np.ndarray:
    """Mann-Whitney AUC (ties count one half) for each row of ``weights`` (shape (B, n)) at once.

    With ``weights=None`` it is the plain AUC of (y, p), returned as a 0-d array; NaN where a
    row has no positive or no negative weight. Memory and time are O(B * n)."""
    y, p = _arrays(y, p)
    w = np.ones((1, y.size)) if weights is None else np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if not y.size:
        return np.full(w.shape[0], np.nan) if weights is not None else np.array(np.nan)
    order = np.argsort(p, kind="stable")
    starts = np.flatnonzero(np.r_[True, p[order][1:] != p[order][:-1]])  # first index of each tie group
    w, y = w[:, order], y[order]
    pos = np.add.reduceat(w * (y == 1), starts, axis=1)  # (B, G) positive weight per tie group
    neg = np.add.reduceat(w * (y == 0), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # negative weight strictly below each group
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos * (below + 0.5 * neg)).sum(1) / (pos.sum(1) * neg.sum(1))
    return auc if weights is not None else auc[0]


def roc_auc(y, p) -> float | None:
    return _none_if_nan(float(weighted_auc(y, p)))


def _image_losses(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Binary cross-entropy of each image (scores clipped away from 0 and 1)."""
    p = np.clip(p, EPS, 1 - EPS)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def log_loss(y, p) -> float | None:
    y, p = _arrays(y, p)
    return float(_image_losses(y, p).mean()) if y.size else None


def confusion_matrix(y, p, threshold: float | np.ndarray) -> list[list[int]]:
    """``[[TN, FP], [FN, TP]]`` with PNEUMONIA positive; a score at the threshold is PNEUMONIA."""
    y, p = _arrays(y, p)
    pred = p >= threshold
    return [
        [int(((y == 0) & ~pred).sum()), int(((y == 0) & pred).sum())],
        [int(((y == 1) & ~pred).sum()), int(((y == 1) & pred).sum())],
    ]


def _rates(tn, fp, fn, tp) -> dict[str, float]:
    """Rates from (possibly weighted, possibly vectorised) counts; NaN where undefined."""
    tn, fp, fn, tp = (np.asarray(v, dtype=np.float64) for v in (tn, fp, fn, tp))
    with np.errstate(invalid="ignore", divide="ignore"):
        total = tn + fp + fn + tp
        sensitivity = tp / (tp + fn)
        no_positives = (tp + fn) == 0  # precision and F1 say nothing without a positive case: undefined
        precision = np.where(no_positives, np.nan, tp / (tp + fp))
        return {
            "accuracy": (tp + tn) / total,
            "sensitivity": sensitivity,
            "specificity": tn / (tn + fp),
            "precision": precision,
            "f1": np.where(no_positives, np.nan, 2 * tp / (2 * tp + fp + fn)),
        }


def undefined_reason(report: dict, key: str) -> str | None:
    """Why ``report[key]`` is undefined (``None``), from its confusion matrix, in a few words for people;
    None where the metric has a value or the reason is not known."""
    if report.get(key) is not None or "confusion_matrix" not in report:
        return None
    (tn, fp), (fn, tp) = report["confusion_matrix"]
    positives, negatives, called = tp + fn, tn + fp, tp + fp
    if key == "auc":
        return "one class only"
    if key == "specificity":
        return "no negative case" if not negatives else None
    if key in ("sensitivity", "precision", "f1"):
        if key == "precision" and not called:
            return "none predicted positive"
        return "no positive case" if not positives else None
    return None


def binary_metrics(y, p, threshold: float | np.ndarray = 0.5) -> dict:
    """The full set of DESIGN.md's metrics at one threshold, or at one threshold per image (no intervals)."""
    from sklearn.metrics import classification_report

    y, p = _arrays(y, p)
    cm = confusion_matrix(y, p, threshold)
    (tn, fp), (fn, tp) = cm
    rates = {k: _none_if_nan(float(v)) for k, v in _rates(tn, fp, fn, tp).items()}
    report = (
        classification_report(
            y,
            (p >= threshold).astype(int),
            labels=[0, 1],
            target_names=list(CLASSES),
            output_dict=True,
            zero_division=0,
        )
        if y.size
        else {}
    )
    return {
        "n": int(y.size),
        "n_normal": int((y == 0).sum()),
        "n_pneumonia": int((y == 1).sum()),
        "threshold": float(threshold) if np.ndim(threshold) == 0 else None,  # per-image thresholds: None
        "loss": log_loss(y, p),
        "auc": roc_auc(y, p),
        **rates,
        "confusion_matrix": cm,
        "classification_report": report,
    }


def bootstrap_ci(
    y, p, groups, threshold: float, n_resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, list[float] | None]:
    """Percentile intervals from resampling *patients* (``groups``) with replacement.

    Resamples are evaluated as weighted metrics, many at a time, so 2000 take a second or two."""
    y, p = _arrays(y, p)
    if not y.size:
        return {m: None for m in CI_METRICS}
    _, patient = np.unique(np.asarray(groups), return_inverse=True)
    n_patients = int(patient.max()) + 1
    rng = np.random.default_rng(seed)
    pred = p >= threshold
    cells = np.stack([(y == 0) & ~pred, (y == 0) & pred, (y == 1) & ~pred, (y == 1) & pred], axis=1).astype(float)
    bce = _image_losses(y, p)
    parts = []
    chunk = max(1, 4_000_000 // max(y.size, n_patients))  # resamples at a time: bounded memory
    for start in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - start)
        draws = rng.integers(0, n_patients, size=(b, n_patients))
        flat = (np.arange(b)[:, None] * n_patients + draws).ravel()
        counts = np.bincount(flat, minlength=b * n_patients).reshape(b, n_patients).astype(float)
        w = counts[:, patient]  # (b, n): how often each image is in each resample
        tn, fp, fn, tp = (w @ cells).T
        parts.append({**_rates(tn, fp, fn, tp), "auc": weighted_auc(y, p, w), "loss": (w @ bce) / w.sum(1)})
    values = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
    tail = (1 - level) / 2 * 100
    out = {}
    for name in CI_METRICS:
        v = values[name][np.isfinite(values[name])]
        out[name] = [float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))] if v.size else None
    return out


def expected_calibration_error(y, p, n_bins: int = 15) -> float | None:
    """ECE of the PNEUMONIA probability: equal-width bins, |mean score - positive rate| weighted by bin size."""
    y, p = _arrays(y, p)
    if not y.size:
        return None
    return float(sum(count * abs(score - rate) for score, rate, count in reliability_curve(y, p, n_bins)) / y.size)


def reliability_curve(y, p, n_bins: int = 15) -> list[tuple[float, float, int]]:
    """(mean score, positive rate, count) for each non-empty bin, for the reliability diagram."""
    y, p = _arrays(y, p)
    which = np.clip(np.digitize(p, np.linspace(0, 1, n_bins + 1)[1:-1]), 0, n_bins - 1)
    return [
        (float(p[which == b].mean()), float(y[which == b].mean()), int((which == b).sum()))
        for b in range(n_bins)
        if (which == b).any()
    ]


TEMPERATURE_BOUNDS = (0.05, 20.0)  # the widest a fitted temperature may go
THRESHOLD_BOUNDS = (0.01, 0.99)  # a fitted threshold is kept inside: 0 or 1 would label every image alike


def separated(y, logits) -> bool:
    """Whether every PNEUMONIA score is above every NORMAL one (both classes present). On such a set no
    temperature can be fitted: the log loss keeps falling as the temperature goes to 0."""
    y, z = _arrays(y, logits)
    pos, neg = z[y == 1], z[y == 0]
    return bool(pos.size and neg.size and pos.min() > neg.max())


def fit_temperature(y, logits, bounds: tuple[float, float] = TEMPERATURE_BOUNDS, fallback: float = 1.0) -> float:
    """The temperature T in ``bounds`` minimising the log loss of sigmoid(logits / T) (Guo et al. 2017);
    ``fallback`` where these labels cannot fit one (one class only, or the classes perfectly separated)."""
    from scipy.optimize import minimize_scalar

    y, z = _arrays(y, logits)
    if np.unique(y).size < 2 or separated(y, z):
        return float(fallback)

    def nll(log_t: float) -> float:
        s = z / math.exp(log_t)
        return float(np.mean(np.logaddexp(0, s) - y * s))

    result = minimize_scalar(nll, bounds=(math.log(bounds[0]), math.log(bounds[1])), method="bounded")
    return float(math.exp(result.x))


def choose_threshold(y, p, target_sensitivity: float | None = None) -> float:
    """The operating threshold: Youden's J (sensitivity + specificity - 1) maximised, or the
    highest threshold that keeps sensitivity at ``target_sensitivity`` or above."""
    y, p = _arrays(y, p)
    if np.unique(y).size < 2:
        return 0.5
    candidates = np.unique(p)[::-1]  # descending: each score as a threshold (score >= t is positive)
    pos, neg = (y == 1).sum(), (y == 0).sum()
    order = np.argsort(-p, kind="stable")
    tp = np.cumsum(y[order] == 1)
    fp = np.cumsum(y[order] == 0)
    last_of_group = np.r_[p[order][1:] != p[order][:-1], True]
    tpr, fpr = tp[last_of_group] / pos, fp[last_of_group] / neg
    if target_sensitivity is None:
        best = int(np.argmax(np.round(tpr - fpr, 12)))  # ties: the higher threshold
    else:
        reaching = np.flatnonzero(tpr >= target_sensitivity)
        best = int(reaching[0]) if reaching.size else len(candidates) - 1
    return float(candidates[best])


OPERATING_RULES = ("balanced", "youden")  # or a target sensitivity, which overrides either


@dataclass
class OperatingPoint:
    temperature: float
    threshold: float
    rule: str  # as recorded in a bundle: balanced, youden or sensitivity>=X
    warnings: list[str] = field(default_factory=list)  # where a value was bounded or could not be fitted


def operating_point(
    y,
    logits,
    rule: str = "balanced",
    target_sensitivity: float | None = None,
    *,
    prior_temperature: float = 1.0,
    spread: float | None = None,
) -> OperatingPoint:
    """Temperature, then the threshold on the calibrated probabilities, by ``rule``:

    - ``balanced``: probability 0.5, which is logit 0 whatever the temperature: the class-balanced
      decision boundary of a model trained with balanced class weights;
    - ``youden``: Youden's J (sensitivity + specificity - 1) maximised on these images (on classes that
      these scores separate perfectly, the middle of the gap between them, in logits);
    - with ``target_sensitivity``: the highest threshold whose sensitivity here reaches it.

    Bounded so that a small or separable set never gives a degenerate model: the temperature stays
    ``prior_temperature`` where it cannot be fitted (one class, perfect separation) and within
    ``prior_temperature`` divided or multiplied by ``spread`` (default :data:`TEMPERATURE_BOUNDS`); the
    threshold within :data:`THRESHOLD_BOUNDS`. Each bound that acts adds a line to ``warnings``."""
    if rule not in OPERATING_RULES:
        raise ValueError(f"unknown operating rule {rule!r}; expected one of {', '.join(OPERATING_RULES)}")
    y, z = _arrays(y, logits)
    warnings: list[str] = []
    bounds = (prior_temperature / spread, prior_temperature * spread) if spread else TEMPERATURE_BOUNDS
    split = separated(y, z)
    temperature = fit_temperature(y, z, bounds, fallback=prior_temperature)
    if split:
        warnings.append(
            f"the model separates these {y.size} images perfectly, so no temperature can be fitted on them; "
            f"temperature {prior_temperature:.4g} kept"
        )
    elif np.unique(y).size == 2 and min(abs(math.log(temperature / b)) for b in bounds) < 1e-3:
        allowed = f"{bounds[0]:.4g}..{bounds[1]:.4g}"
        warnings.append(f"the fitted temperature hit its bound {temperature:.4g} (allowed {allowed})")
    p = sigmoid(z, temperature)
    if target_sensitivity is not None:
        threshold, name = choose_threshold(y, p, target_sensitivity), f"sensitivity>={target_sensitivity}"
    elif rule == "balanced":
        threshold, name = 0.5, "balanced"
    elif split:
        threshold, name = float(sigmoid((z[y == 1].min() + z[y == 0].max()) / 2, temperature)), "youden"
    else:
        threshold, name = choose_threshold(y, p), "youden"
    low, high = THRESHOLD_BOUNDS
    if not low <= threshold <= high:
        warnings.append(f"the fitted threshold {threshold:.6g} was bounded to {min(max(threshold, low), high)}")
        threshold = min(max(threshold, low), high)
    return OperatingPoint(float(temperature), float(threshold), name, warnings)


def fit_operating_point(
    y, logits, rule: str = "balanced", target_sensitivity: float | None = None
) -> tuple[float, float, str]:
    """``(temperature, threshold, rule name as recorded)`` by :func:`operating_point`."""
    fitted = operating_point(y, logits, rule, target_sensitivity)
    return fitted.temperature, fitted.threshold, fitted.rule


def _delong_components(x: np.ndarray, z: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """The AUC of positives' scores ``x`` over negatives' ``z`` and its DeLong structural components: per
    positive, the share of negatives below it; per negative, the share of positives above it (ties half)."""
    from scipy.stats import rankdata

    m, n = len(x), len(z)
    rank_all = rankdata(np.r_[x, z])
    rank_x, rank_z = rankdata(x), rankdata(z)
    auc = (rank_all[:m].sum() - m * (m + 1) / 2) / (m * n)
    return float(auc), (rank_all[:m] - rank_x) / n, 1 - (rank_all[m:] - rank_z) / m


def auc_interval(y, p) -> tuple[float, float, float] | None:
    """The AUC and its 95% DeLong interval (clipped to [0, 1]); None with fewer than 2 images of a class."""
    y, p = _arrays(y, p)
    pos, neg = y == 1, y == 0
    m, n = int(pos.sum()), int(neg.sum())
    if m < 2 or n < 2:
        return None
    auc, v10, v01 = _delong_components(p[pos], p[neg])
    se = math.sqrt(max(np.var(v10, ddof=1) / m + np.var(v01, ddof=1) / n, 0.0))
    return auc, max(auc - 1.96 * se, 0.0), min(auc + 1.96 * se, 1.0)


def delong_test(y, p_a, p_b) -> dict:
    """Paired comparison of two AUCs on the same images (DeLong et al. 1988, fast midrank form).

    Returns both AUCs, their difference (a - b) with its 95% interval, and the two-sided p-value."""
    from scipy.stats import norm

    y, p_a = _arrays(y, p_a)
    _, p_b = _arrays(y, p_b)
    pos, neg = y == 1, y == 0
    m, n = int(pos.sum()), int(neg.sum())
    if m < 2 or n < 2:
        return {"auc_a": roc_auc(y, p_a), "auc_b": roc_auc(y, p_b), "difference": None, "ci95": None, "p_value": None}
    aucs, v10, v01 = zip(*(_delong_components(scores[pos], scores[neg]) for scores in (p_a, p_b)))
    s10, s01 = np.cov(np.array(v10)), np.cov(np.array(v01))
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    diff = aucs[0] - aucs[1]
    if var <= 0:
        return {
            "auc_a": float(aucs[0]),
            "auc_b": float(aucs[1]),
            "difference": float(diff),
            "ci95": [float(diff), float(diff)],
            "p_value": 1.0 if diff == 0 else 0.0,
        }
    se = math.sqrt(var)
    return {
        "auc_a": float(aucs[0]),
        "auc_b": float(aucs[1]),
        "difference": float(diff),
        "ci95": [float(diff - 1.96 * se), float(diff + 1.96 * se)],
        "p_value": float(2 * norm.sf(abs(diff) / se)),
    }


def subtype_report(y_viral, p_viral, groups, threshold: float, n_resamples: int = 2000, seed: int = 0, split="test"):
    """The bacterial/viral block of metrics.json: the usual metrics with viral as the positive class
    (sensitivity: viral cases found; specificity: bacterial ones), counts named by subtype."""
    report = full_report(y_viral, p_viral, groups, threshold, n_resamples, seed, split)
    report["n_bacterial"], report["n_viral"] = report.pop("n_normal"), report.pop("n_pneumonia")
    names = {"NORMAL": "bacterial", "PNEUMONIA": "viral"}
    report["classification_report"] = {names.get(k, k): v for k, v in report["classification_report"].items()}
    report["positive"] = "viral"
    return report


def full_report(y, p, groups, threshold: float, n_resamples: int = 2000, seed: int = 0, split: str = "test") -> dict:
    """metrics.json's body for one threshold: point values, intervals by patient, ECE."""
    out = {"split": split, **binary_metrics(y, p, threshold)}
    out["ci95"] = bootstrap_ci(y, p, groups, threshold, n_resamples, seed)
    out["ece"] = expected_calibration_error(y, p)
    out["patients"] = int(np.unique(np.asarray(groups)).size)
    return out


def patient_folds(y, groups, k: int, seed: int = 0) -> np.ndarray:
    """Fold index (0..k-1) of each image: patients dealt into ``k`` folds, class by class (a patient's
    class is its highest label), so that every fold has both classes and no patient spans two folds."""
    y = np.asarray(y, dtype=np.int64)
    groups = np.asarray(groups)
    patients, index = np.unique(groups, return_inverse=True)
    patient_label = np.zeros(len(patients), dtype=np.int64)
    np.maximum.at(patient_label, index, y)
    rng = np.random.default_rng(seed)
    patient_fold = np.zeros(len(patients), dtype=np.int64)
    for label in (0, 1):
        members = np.flatnonzero(patient_label == label)
        if len(members) < k:
            raise ValueError(f"{k} folds need at least {k} patients of each class, found {len(members)}")
        patient_fold[rng.permutation(members)] = np.arange(len(members)) % k
    return patient_fold[index]


def cross_fit(
    y,
    logits,
    groups,
    k: int = 5,
    rule: str = "youden",
    target_sensitivity: float | None = None,
    seed: int = 0,
    fold: np.ndarray | None = None,
) -> dict:
    """Cross-fitted local calibration: for each patient fold, temperature and threshold are fitted on
    the other folds (by :func:`fit_operating_point`, the rule ``calibrate`` uses) and applied to it.

    Returns per image ``fold``, ``probability`` and ``threshold`` (arrays), and per fold ``temperatures``
    and ``thresholds``: what a site gets from calibrating on its own labelled images, estimated
    without any image's calibration seeing its own label. ``fold`` overrides :func:`patient_folds`."""
    y = np.asarray(y, dtype=np.int64)
    z = np.asarray(logits, dtype=np.float64)
    fold = patient_folds(y, groups, k, seed) if fold is None else np.asarray(fold)
    probability, threshold = np.zeros(len(y)), np.zeros(len(y))
    temperatures, thresholds = [], []
    for f in range(k):
        held, rest = fold == f, fold != f
        temperature, t, _ = fit_operating_point(y[rest], z[rest], rule, target_sensitivity)
        probability[held] = sigmoid(z[held], temperature)
        threshold[held] = t
        temperatures.append(temperature)
        thresholds.append(t)
    return {
        "fold": fold,
        "probability": probability,
        "threshold": threshold,
        "temperatures": temperatures,
        "thresholds": thresholds,
    }
