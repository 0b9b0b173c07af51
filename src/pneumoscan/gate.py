"""The input gate: refuse what does not look like the chest X-rays a model was trained on.

The score lives in the network's own pooled features, square-rooted (the pooled activations are
non-negative and heavy-tailed; the root evens out their variances, as for counts). Training features
are centred and reduced by PCA to ``k`` directions; an input's score is its squared Mahalanobis distance
in those directions plus its squared distance from their span (the residual), each divided by its mean
on training images, so that a typical training X-ray scores about 2. The limit is a high quantile of
the scores of validation X-rays, clean and under the acquisition perturbations of
:mod:`pneumoscan.shift` (exposure, gamma, contrast, blur, noise, resolution, JPEG quality), so a
different scanner passes and a photograph does not. The gate is a few hundred kilobytes of numbers in
the bundle (``gate.safetensors``, sha256 in config.json) and costs one small matrix product per batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError

COMPONENTS = 32
KEEP = 0.995  # share of validation X-rays (clean and perturbed) under the limit
REFUSAL = "does not look like a chest X-ray"


@dataclass
class Gate:
    mean: np.ndarray  # (F,)
    components: np.ndarray  # (k, F), orthonormal rows
    scale: np.ndarray  # (k,), standard deviation along each component
    residual_scale: float  # mean squared residual of training features
    limit: float

    def score(self, features: np.ndarray) -> np.ndarray:
        """The out-of-distribution score of each row of ``features`` (higher: less like training X-rays)."""
        centred = _transform(features) - self.mean
        projected = centred @ self.components.T
        mahalanobis = ((projected / self.scale) ** 2).mean(axis=1)
        residual = np.maximum((centred**2).sum(axis=1) - (projected**2).sum(axis=1), 0) / self.residual_scale
        score = mahalanobis + residual
        return np.where(np.isfinite(score), score, np.inf)

    def accepts(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) <= self.limit

    @classmethod
    def fit(cls, train: np.ndarray, calibration: np.ndarray, k: int = COMPONENTS, keep: float = KEEP) -> Gate:
        """Fit on training features; set the limit so that ``keep`` of the ``calibration`` features pass."""
        train = _transform(train)
        mean = train.mean(axis=0)
        _, singular, vt = np.linalg.svd(train - mean, full_matrices=False)
        k = min(k, vt.shape[0])
        scale = np.maximum(singular[:k] / math.sqrt(max(len(train) - 1, 1)), 1e-8)
        centred = train - mean
        projected = centred @ vt[:k].T
        residual_scale = max(float(((centred**2).sum(1) - (projected**2).sum(1)).mean()), 1e-12)
        gate = cls(mean, vt[:k], scale, residual_scale, math.inf)
        gate.limit = float(np.quantile(gate.score(calibration), keep))
        return gate

    def to_bytes(self) -> bytes:
        """The gate as a safetensors file's bytes (a bundle's ``gate.safetensors``)."""
        from safetensors.numpy import save

        arrays = {
            "mean": self.mean.astype(np.float32),
            "components": self.components.astype(np.float32),
            "scale": self.scale.astype(np.float32),
            "residual_scale": np.array([self.residual_scale], np.float32),
            "limit": np.array([self.limit], np.float32),
        }
        return save(arrays, metadata={"format": "pneumoscan-gate/1"})

    @classmethod
    def load(cls, path: Path, n_features: int | None = None) -> Gate:
        """A gate from its file, or one line saying why it cannot be one (shapes, finiteness)."""
        from safetensors.numpy import load_file

        try:
            a = load_file(str(path))
            mean, components, scale = a["mean"], a["components"], a["scale"]
            residual_scale, limit = float(a["residual_scale"][0]), float(a["limit"][0])
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"{path}: not a readable gate ({type(exc).__name__})") from None
        features = mean.shape[0] if mean.ndim == 1 else -1
        shapes_ok = (
            mean.ndim == 1
            and components.ndim == 2
            and components.shape[1] == features
            and scale.shape == (components.shape[0],)
            and (n_features is None or features == n_features)
        )
        values_ok = all(np.isfinite(x).all() for x in (mean, components, scale)) and (scale > 0).all()
        if not shapes_ok or not values_ok or not (residual_scale > 0 and math.isfinite(limit) and limit > 0):
            raise ConfigError(f"{path}: gate arrays have the wrong shapes or values")
        return cls(
            mean.astype(np.float64), components.astype(np.float64), scale.astype(np.float64), residual_scale, limit
        )


def _transform(features: np.ndarray) -> np.ndarray:
    """Signed square root: the plain root for a CNN's non-negative pooled features, and sign-preserving
    for a ViT's signed token features."""
    features = np.asarray(features, dtype=np.float64)
    return np.sign(features) * np.sqrt(np.abs(features))


def refusal(score: float, limit: float) -> str:
    """The error of a refused input (its path stands beside it, in the result and on the error line)."""
    return f"{REFUSAL} (score {score:.1f}, limit {limit:.1f})"
