"""Bacterial or viral: Kermany's second task, as a second head on the same network.

The head reads the pooled features the pneumonia head reads (square-rooted and standardised, as the
input gate does), and gives one logit of VIRAL. It is fitted on training pneumonia images only, by
class-weighted logistic regression (bacterial cases outnumber viral ones two to one), so the binary task
is untouched: the same weights give the same PNEUMONIA probabilities. Its temperature and threshold come
from validation pneumonia images by the same rules as the main task. It is a few kilobytes in the bundle
(``subtype.safetensors``, sha256 in config.json).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumoscan.core.errors import ConfigError
from pneumoscan.core.labels import SUBTYPES
from pneumoscan.model.heads.base import Batch, Evaluation, FeatureHead, FitData, Fitted, ResultField, signed_root

L2_GRID = (1.0, 10.0, 100.0, 1000.0, 10000.0)  # regularisation strengths tried, chosen on validation


def with_subtype(samples: list) -> list[int]:
    """The indices of PNEUMONIA samples whose file names tell the subtype."""
    return [i for i, s in enumerate(samples) if s.label == 1 and s.subtype in SUBTYPES]


def is_viral(samples: list, index: list[int]) -> np.ndarray:
    return np.array([samples[i].subtype == SUBTYPES[1] for i in index], dtype=int)


@dataclass
class SubtypeHead(FeatureHead):
    mean: np.ndarray  # (F,) of the transformed features
    scale: np.ndarray  # (F,)
    weights: np.ndarray  # (F,)
    bias: float
    temperature: float
    threshold: float
    rule: str = "balanced"

    name = "subtype"
    filename = "subtype.safetensors"
    description = "the bacterial/viral head"
    fields = (
        ResultField("subtype", "likely subtype (a second head, less certain)"),
        ResultField("viral_probability", "probability viral", 6),
    )

    @classmethod
    def from_training(cls, data: FitData) -> Fitted:
        """Fitted on the training pneumonia images whose names tell the subtype, with its validation report;
        no head where either split lacks a subtype."""
        from pneumoscan.core import metrics as M

        train_idx, val_idx = with_subtype(data.train_samples), with_subtype(data.val_samples)
        train_features, val_features = data.features("train", train_idx), data.features("val", val_idx)
        y_train, y_val = is_viral(data.train_samples, train_idx), is_viral(data.val_samples, val_idx)
        if len(set(y_train.tolist())) < 2 or len(set(y_val.tolist())) < 2:
            why = "subtype head: not fitted (no subtype in the training or validation file names)"
            return Fitted(None, None, [why])
        head = cls.fit(train_features, y_train, val_features, y_val)
        groups = [data.val_samples[i].patient for i in val_idx]
        report = M.subtype_report(
            y_val, head.viral_probability(val_features), groups, head.threshold, split="validation"
        )
        line = f"subtype head: validation AUC {report['auc']:.3f}, temperature {head.temperature:.3f}"
        return Fitted(head, report, [line])

    def apply(self, batch: Batch) -> list[dict]:
        """Subtype and viral probability for the PNEUMONIA results."""
        from pneumoscan.core.labels import CLASSES

        viral = self.viral_probability(batch.features)
        return [
            {"subtype": self.label(v), "viral_probability": float(v)} if label == CLASSES[1] else {}
            for label, v in zip(batch.labels, viral)
        ]

    def evaluate(self, data: Evaluation) -> dict | None:
        """Bacterial or viral on the true-pneumonia images whose names tell the subtype (None: there are none)."""
        from pneumoscan.core import metrics as M

        index = with_subtype(data.samples)
        if not index:
            return None
        y, p = is_viral(data.samples, index), self.viral_probability(data.features[index])
        groups = [data.samples[i].patient for i in index]
        return M.subtype_report(y, p, groups, self.threshold, data.n_resamples, data.seed, data.split)

    @classmethod
    def report_lines(cls, report: dict, n: int) -> list[str]:
        from pneumoscan.core.metrics import HEADLINE
        from pneumoscan.core.text import with_ci

        lines = [
            f"bacterial or viral, on {report['n']} true pneumonia images ({report['n_bacterial']} bacterial, "
            f"{report['n_viral']} viral), viral when probability >= {report['threshold']:.3f}:"
        ]
        return lines + [f"{key:<12} {with_ci(report, key):<28}" for key in (*HEADLINE, "loss")]

    @classmethod
    def figures(cls, report: dict, folder: Path) -> dict[str, Path]:
        from pneumoscan.report.figures import plot_confusion

        path = plot_confusion(report["confusion_matrix"], folder / "subtype_confusion.png", SUBTYPES)
        return {"Bacterial or viral: confusion matrix (true pneumonia)": path}

    def logits(self, features: np.ndarray) -> np.ndarray:
        """Logits of VIRAL for pooled features ``(N, F)``."""
        return ((signed_root(features) - self.mean) / self.scale) @ self.weights + self.bias

    def viral_probability(self, features: np.ndarray) -> np.ndarray:
        from pneumoscan.core.metrics import sigmoid

        return sigmoid(self.logits(features), self.temperature)

    def label(self, viral_probability: float) -> str:
        return SUBTYPES[1] if viral_probability >= self.threshold else SUBTYPES[0]

    @classmethod
    def fit(
        cls,
        train_features: np.ndarray,
        train_viral: np.ndarray,
        val_features: np.ndarray,
        val_viral: np.ndarray,
        l2_grid: tuple[float, ...] = L2_GRID,
        rule: str = "balanced",
    ) -> SubtypeHead:
        """Class-weighted, L2-regularised logistic regression on the training features, its L2 strength
        chosen on validation (AUC; ties to the stronger); temperature and threshold on validation too
        (:func:`metrics.fit_operating_point`)."""
        from pneumoscan.core.metrics import fit_operating_point, roc_auc

        best = None
        for l2 in sorted(l2_grid, reverse=True):
            head = cls._fit_weights(train_features, train_viral, l2, rule)
            auc = roc_auc(val_viral, head.logits(val_features)) or 0.0
            if best is None or auc > best[0]:
                best = (auc, head)
        head = best[1]
        head.temperature, head.threshold, head.rule = fit_operating_point(val_viral, head.logits(val_features), rule)
        return head

    @classmethod
    def _fit_weights(cls, train_features, train_viral, l2: float, rule: str) -> SubtypeHead:
        from scipy.optimize import minimize

        x = signed_root(train_features)
        mean, scale = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6)
        x = (x - mean) / scale
        y = np.asarray(train_viral, dtype=np.float64)
        w_pos, w_neg = len(y) / (2 * max(y.sum(), 1)), len(y) / (2 * max(len(y) - y.sum(), 1))
        sample_weight = np.where(y == 1, w_pos, w_neg) / len(y)

        def loss(params):
            w, b = params[:-1], params[-1]
            z = x @ w + b
            nll = np.logaddexp(0, z) - y * z
            grad_z = (1 / (1 + np.exp(-z)) - y) * sample_weight
            value = float((nll * sample_weight).sum() + 0.5 * l2 * (w @ w) / len(y))
            return value, np.r_[x.T @ grad_z + l2 * w / len(y), grad_z.sum()]

        result = minimize(loss, np.zeros(x.shape[1] + 1), jac=True, method="L-BFGS-B", options={"maxiter": 500})
        return cls(mean, scale, result.x[:-1], float(result.x[-1]), 1.0, 0.5, rule)

    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        arrays = {
            "mean": self.mean.astype(np.float32),
            "scale": self.scale.astype(np.float32),
            "weights": self.weights.astype(np.float32),
            "bias_temperature_threshold": np.array([self.bias, self.temperature, self.threshold], np.float32),
        }
        return save(arrays, metadata={"format": "pneumoscan-subtype/1", "rule": self.rule})

    @classmethod
    def load(cls, path: Path, n_features: int | None = None) -> SubtypeHead:
        from safetensors import safe_open
        from safetensors.numpy import load_file

        try:
            a = load_file(str(path))
            with safe_open(str(path), framework="numpy") as f:
                rule = (f.metadata() or {}).get("rule", "balanced")
            mean, scale, weights = a["mean"], a["scale"], a["weights"]
            bias, temperature, threshold = (float(v) for v in a["bias_temperature_threshold"])
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"{path}: not a readable subtype head ({type(exc).__name__})") from None
        n = mean.shape[0] if mean.ndim == 1 else -1
        shapes_ok = mean.ndim == 1 and scale.shape == (n,) and weights.shape == (n,)
        shapes_ok = shapes_ok and (n_features is None or n == n_features)
        finite = all(np.isfinite(v).all() for v in (mean, scale, weights)) and (scale > 0).all()
        if not (shapes_ok and finite and math.isfinite(bias) and 1e-3 <= temperature <= 1e3 and 0 < threshold < 1):
            raise ConfigError(f"{path}: subtype head arrays have the wrong shapes or values")
        return cls(
            mean.astype(np.float64),
            scale.astype(np.float64),
            weights.astype(np.float64),
            bias,
            temperature,
            threshold,
            rule[:40],
        )
