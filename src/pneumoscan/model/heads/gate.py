"""The input gate: refuse what does not look like the chest X-rays a model was trained on, and flag
degraded films.

Three parts, each fitted on training X-rays and given a limit on validation X-rays (carved from train by
patient), clean and under the acquisition perturbations of :mod:`pneumoscan.io.shift` (exposure, gamma,
contrast, blur, noise, resolution, JPEG quality), so that another scanner passes and a photograph does not:

- **Image statistics** (:func:`image_statistics`): histogram shape, edge energy at four scales, the
  coarse layout of the film (a 7 x 7 grid of brightness), flat and sharp areas, the brightness across the
  film in 14 bands, and how much it changes across against down; computed in numpy on the
  grey 224-pixel image the model reads, so every engine (PyTorch, ONNX fp32, ONNX int8) sees the same
  numbers. Score: the mean squared Mahalanobis distance from training X-rays (clean and perturbed).
  This part refuses what the network's features barely see: flat fields, gradients, vignettes, text,
  noise, monitors, screenshots, composites and crops.
- **Orientation**: the layout's distance as given, divided by its distance after the best of the seven
  other turns and inversions. A film rotated or with white and black swapped fits much better once turned
  back, and the refusal says so ("rotated by 90 degrees clockwise", "inverted"); upright films never did
  on validation.
- **Pooled features** of the network, square-rooted (non-negative and heavy-tailed; the root evens out
  their variances): squared Mahalanobis distance in the top ``k`` principal directions plus the squared
  residual from their span, each over its training mean. Its limit is set per engine, because int8
  quantisation moves the features (``int8_limit``, fitted when the bundle has an int8 model).

Each part's score is divided by its limit; the gate's score is the largest of the three, so its limit
is 1 and the score is the margin. Each part keeps ``KEEP`` of the validation X-rays, so together at
least 99.5%. Statistics outside the range of every validation X-ray (clean or perturbed) become
``warnings`` on an accepted film (very bright, blurred, padded...). The gate is a few hundred kilobytes
of numbers in the bundle (``gate.safetensors``, sha256 in config.json).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pneumoscan.core.errors import ConfigError
from pneumoscan.model.heads.base import ERROR, Batch, Evaluation, FeatureHead, FitData, Fitted, ResultField, signed_root

COMPONENTS = 32
KEEP = 0.9985  # share of validation X-rays (clean and perturbed) under each part's limit (three parts: >= 99.5%)
WARN_QUANTILES = (0.001, 0.999)  # statistics beyond these quantiles of validation X-rays are warned about
LIMIT = 1.0  # every score is divided by its limit
REFUSAL = "does not look like a chest X-ray"
FORMAT = "pneumoscan-gate/3"
# Statistics are only ever appended: a gate of an earlier format reads the first ones, as it was fitted.
STATISTICS_BY_FORMAT = {"pneumoscan-gate/2": 69, FORMAT: 88}
TRAIN_IMAGES = 1500  # training images whose features define the gate's distribution
PERTURBED_IMAGES = 96  # per acquisition perturbation: training ones fit the statistics, validation ones set limits
PERTURBED_IMAGES_CACHED = 32  # validation images per perturbation where features were cached (each a backbone pass)

GRID = 7  # the layout: mean brightness over a GRID x GRID grid of the image (of 8-pixel blocks)
PROFILE = 14  # the column profile: mean brightness of PROFILE vertical bands (finer across than the layout)
SCALES = (1, 2, 4, 8)  # edge energy after averaging over blocks of these sides (each twice the last)
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
STATISTICS = (
    *(f"quantile {q}" for q in QUANTILES),
    "mean",
    "std",
    "entropy",
    "black share",
    "white share",
    *(f"edges at {s} px" for s in SCALES),
    *(f"layout {r},{c}" for r in range(GRID) for c in range(GRID)),
    "flat share",
    "sharp share",
    "curvature at 4 px",
    "curvature at 8 px",
    *(f"column band {c}" for c in range(PROFILE)),  # pneumoscan-gate/3 on
    "left-right difference",
    *(f"edge anisotropy at {s} px" for s in SCALES),
)
LAYOUT = slice(STATISTICS.index("layout 0,0"), STATISTICS.index("layout 0,0") + GRID * GRID)
# (statistic, side, warning) for statistics beyond every validation X-ray; colour is the loader's.
WARNINGS = (
    ("mean", "high", "very bright image"),
    ("white share", "high", "very bright image"),
    ("mean", "low", "very dark image"),
    ("black share", "high", "very dark image"),
    ("std", "low", "low contrast"),
    ("quantile 0.05", "high", "low contrast"),
    ("edges at 1 px", "low", "blurred or low resolution"),
    ("edges at 2 px", "low", "blurred or low resolution"),
    ("flat share", "high", "wide uniform border or padding"),
    ("sharp share", "high", "text or markings over the image"),
)
COLOUR_WARNING = "colour image, read as grey"
PART_REASONS = (  # a refusal's reason, by the part furthest over its limit, where no statistic names one
    "the network sees something else",
    "its brightness, edges and layout are not a chest film's",
    "its layout is not a frontal chest film's",
)
COLOUR_LIMIT = 0.04  # mean chroma (0-1) above which a colour input is warned about


def image_statistics(images: np.ndarray) -> np.ndarray:
    """The statistics (:data:`STATISTICS`) of uint8 grey images ``(N, S, S)``: ``(N, D)`` floats."""
    images = np.asarray(images, np.uint8)
    n = len(images)
    images = images[:, : images.shape[1] // 8 * 8, : images.shape[2] // 8 * 8]  # whole 8-pixel blocks
    pixels = images.shape[1] * images.shape[2]
    offsets = (256 * np.arange(n))[:, None]
    hist = np.bincount((images.reshape(n, -1) + offsets).ravel(), minlength=256 * n).reshape(n, 256)
    cdf = np.cumsum(hist, axis=1) / pixels
    quantiles = np.stack([(cdf < q).sum(1) for q in QUANTILES], 1) / 255.0
    levels = np.arange(256) / 255.0
    mean = hist @ levels / pixels
    std = np.sqrt(np.maximum(hist @ levels**2 / pixels - mean**2, 0))
    p = hist.reshape(n, 32, 8).sum(2) / pixels
    entropy = -(p * np.log(np.where(p > 0, p, 1))).sum(1)
    black, white = cdf[:, 3], 1 - cdf[:, 251]
    x = images.astype(np.float32) / 255
    pyramid, squares = [x], x * x  # block means at sides 1, 2, 4, 8; squares for the 8-pixel blocks' spread
    for _ in SCALES[1:]:
        pyramid.append(_halve(pyramid[-1]))
        squares = _halve(squares)
    down, across = ([_edge(y, axis) for y in pyramid] for axis in (1, 2))
    edges = [np.log(d + a + 1e-4) for d, a in zip(down, across)]
    coarse = pyramid[-1]
    side = coarse.shape[1] // GRID, coarse.shape[2] // GRID
    grid = coarse[:, : side[0] * GRID, : side[1] * GRID].reshape(n, GRID, side[0], GRID, side[1]).mean((2, 4))
    layout = (grid.reshape(n, -1) - mean[:, None]) / (std[:, None] + 0.02)
    spread = np.sqrt(np.maximum(squares - coarse**2, 0))
    flat, sharp = (spread < 1.5 / 255).mean((1, 2)), (spread > 0.25).mean((1, 2))
    # curvature: ribs, edges and vessels bend the brightness; smooth gradients and vignettes barely do
    curvature = [np.log(_curvature(y) / (std + 0.02) + 1e-4) for y in pyramid[2:]]
    columns = [*quantiles.T, mean, std, entropy, np.sqrt(black), np.sqrt(white), *edges, *layout.T]
    columns += [np.sqrt(flat), np.sqrt(sharp), *curvature]
    # across the film: two lung fields either side of the spine; a crop of one lung or a framed screen differs
    x = x[:, :, : x.shape[2] // PROFILE * PROFILE]
    bands = x.mean(1).reshape(n, PROFILE, -1).mean(2)
    halves = x[:, :, : x.shape[2] // 2].mean((1, 2)) - x[:, :, x.shape[2] // 2 :].mean((1, 2))
    columns += [*((bands - mean[:, None]) / (std[:, None] + 0.02)).T, np.abs(halves) / (std + 0.02)]
    # change across against change down: set by a film's ribs, spine and outline; a crop stretched to a
    # square, text and pages differ
    columns += [np.log((a + 1e-4) / (d + 1e-4)) for d, a in zip(down, across)]
    return np.column_stack(columns).astype(np.float64)


def _edge(y: np.ndarray, axis: int) -> np.ndarray:
    """Mean absolute difference of neighbouring pixels along ``axis`` (1: down, 2: across)."""
    return np.abs(np.diff(y, axis=axis)).mean((1, 2))


def _curvature(y: np.ndarray) -> np.ndarray:
    """Mean absolute discrete Laplacian."""
    c = y[:, 1:-1, 1:-1]
    return np.abs(y[:, :-2, 1:-1] + y[:, 2:, 1:-1] + y[:, 1:-1, :-2] + y[:, 1:-1, 2:] - 4 * c).mean((1, 2))


def _halve(x: np.ndarray) -> np.ndarray:
    """Means over 2 x 2 blocks."""
    return (x[:, 0::2, 0::2] + x[:, 1::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 1::2]) * 0.25


# The seven other ways a film can reach us: (quarter turns counter-clockwise, inverted), and their names.
TURNS = [(k, inverted) for k in range(4) for inverted in (False, True)][1:]


def _turn_name(k: int, inverted: bool) -> str:
    rotation = {1: "rotated by 90 degrees counter-clockwise", 2: "rotated by 180 degrees",
                3: "rotated by 90 degrees clockwise"}.get(k)  # fmt: skip
    invert = "inverted (white and black swapped)"
    return " and ".join(part for part in (rotation, invert if inverted else None) if part)


@dataclass
class Mahalanobis:
    """Mean squared whitened distance from a fitted cloud of vectors (about 1 inside it)."""

    mean: np.ndarray  # (D,)
    whiten: np.ndarray  # (D, D), the inverse of the Cholesky factor of the (shrunk) covariance

    @classmethod
    def fit(cls, x: np.ndarray, independent: int | None = None) -> Mahalanobis:
        """Fit on vectors ``x`` ``(N, D)`` of which ``independent`` (default N) are independent draws (the
        rest, perturbed copies of some of them, add spread but no new films). The correlations are shrunk
        towards none by :func:`shrinkage` for that many draws: few films, strong shrinkage."""
        x = np.asarray(x, np.float64)
        mean = x.mean(axis=0)
        centred = x - mean
        spread = np.sqrt(np.maximum(centred.var(axis=0, ddof=1), 1e-12)) if len(x) > 1 else np.ones(x.shape[1])
        correlation = np.corrcoef(centred, rowvar=False) if len(x) > 2 else np.eye(x.shape[1])
        correlation = np.nan_to_num(correlation) * (1 - np.eye(len(correlation))) + np.eye(len(correlation))
        rho = shrinkage(correlation, independent or len(x))
        cov = ((1 - rho) * correlation + (rho + 1e-6) * np.eye(len(correlation))) * np.outer(spread, spread)
        return cls(mean, np.linalg.inv(np.linalg.cholesky(cov)))

    def score(self, x: np.ndarray) -> np.ndarray:
        z = (np.asarray(x, np.float64) - self.mean) @ self.whiten.T
        return (z**2).mean(axis=1)


def shrinkage(correlation: np.ndarray, n: int) -> float:
    """The oracle approximating shrinkage (OAS; Chen, Wiesel, Eldar and Hero, 2010) of a ``p x p``
    correlation matrix estimated from ``n`` draws towards the identity: the weight ``rho`` of the identity
    in ``(1 - rho) R + rho I``. It grows as ``n`` shrinks towards ``p`` (about ``p / n`` for weakly
    correlated statistics), and vanishes for many draws."""
    p = len(correlation)
    trace_square = float((correlation**2).sum())  # tr(R^2); tr(R) = p
    denominator = (n + 1 - 2 / p) * (trace_square - p)
    return 1.0 if denominator <= 0 else min(1.0, ((1 - 2 / p) * trace_square + p * p) / denominator)


@dataclass
class FeatureScore:
    """Mahalanobis in the top principal directions of square-rooted pooled features, plus the residual."""

    mean: np.ndarray  # (F,)
    components: np.ndarray  # (k, F), orthonormal rows
    scale: np.ndarray  # (k,), standard deviation along each component
    residual_scale: float  # mean squared residual of training features

    @classmethod
    def fit(cls, train: np.ndarray, k: int = COMPONENTS) -> FeatureScore:
        train = signed_root(train)
        mean = train.mean(axis=0)
        _, singular, vt = np.linalg.svd(train - mean, full_matrices=False)
        k = min(k, vt.shape[0])
        scale = np.maximum(singular[:k] / math.sqrt(max(len(train) - 1, 1)), 1e-8)
        centred = train - mean
        projected = centred @ vt[:k].T
        residual_scale = max(float(((centred**2).sum(1) - (projected**2).sum(1)).mean()), 1e-12)
        return cls(mean, vt[:k], scale, residual_scale)

    def score(self, features: np.ndarray) -> np.ndarray:
        centred = signed_root(features) - self.mean
        projected = centred @ self.components.T
        mahalanobis = ((projected / self.scale) ** 2).mean(axis=1)
        residual = np.maximum((centred**2).sum(axis=1) - (projected**2).sum(axis=1), 0) / self.residual_scale
        return mahalanobis + residual


TAIL = 0.1  # share of the calibration scores (at least TAIL_LEAST of them) whose spread sets the limit
TAIL_LEAST = 10


def keeping(scores: np.ndarray, keep: float) -> float:
    """The limit under which ``keep`` of the calibration X-rays' (positive) scores are expected to lie.

    The empirical ``keep`` quantile rests on the two or three largest scores: a few hundred validation
    films (a quick run's) give a limit that swings with them and refuses a few percent of other real
    films. So the tail is modelled instead (peaks over a threshold): the log-scores above the top
    ``TAIL`` share's threshold ``u`` are taken as exponential with the mean excess ``b`` estimated from
    all of them, and the limit is ``exp(u + b log(TAIL / (1 - keep)))``, never below the empirical
    quantile. Many scores estimate ``b``, whatever the sample size."""
    scores = np.asarray(scores, dtype=np.float64)
    empirical = float(np.quantile(scores, keep))
    logs = np.sort(np.log(np.maximum(scores, 1e-12)))
    n = len(logs)
    m = min(max(TAIL_LEAST, round(TAIL * n)), n - 1)
    if m < 1:
        return empirical
    threshold = logs[n - m - 1]
    excess = float((logs[n - m :] - threshold).mean())
    return max(empirical, float(np.exp(threshold + excess * math.log((m / n) / (1 - keep)))))


@dataclass
class Verdict:
    """The gate on one image: ``score`` over 1 is refused (``reason`` says why); ``warnings`` for the
    accepted."""

    score: float
    reason: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        return self.score <= LIMIT


@dataclass
class Gate(FeatureHead):
    features: FeatureScore
    feature_limit: float  # fp32 (PyTorch and ONNX)
    statistics: Mahalanobis
    statistics_limit: float
    layout: Mahalanobis  # on the LAYOUT statistics only
    orientation_limit: float
    warn_low: np.ndarray  # (D,) below: warned
    warn_high: np.ndarray  # (D,)
    int8_limit: float | None = None  # for int8 ONNX features; None: not fitted, the fp32 limit is used

    limit = LIMIT
    name = "gate"
    filename = "gate.safetensors"
    description = "the input gate"
    fields = (
        ResultField("gate_score", "input gate score", 3),
        ResultField("gate_limit", "input gate limit", 3, csv=False),  # the bundle's, the same on every row
        ResultField("gate", "input gate"),  # "off" where predicted with the gate off
    )

    @classmethod
    def from_training(cls, data: FitData) -> Fitted:
        """The gate for a trained network: fitted on training X-rays (the image statistics also on
        training X-rays under every acquisition perturbation of :mod:`pneumoscan.io.shift`), its limits set on
        validation X-rays, clean and perturbed; for ``heads fit`` on a bundle with an int8 ONNX model, also
        that model's own feature limit."""
        if data.cached:  # features of every film are cached: a few perturbed validation films pass the backbone
            pick = _seeded_pick(len(data.train_samples), TRAIN_IMAGES, data.seed)
            train_images, val_images = data.images("train", pick), data.images("val")
            perturbed = perturbed_sample(val_images, data.seed, PERTURBED_IMAGES_CACHED)
            calibration = np.concatenate([val_images, perturbed])
            calibration_features = np.concatenate([data.features("val"), data.features_of(perturbed)])
            train_features, train_all = data.features("train", pick), train_images
        else:
            train_all, val_images = data.images("train"), data.images("val")
            train_images, calibration = gate_images(train_all, val_images, data.seed)
            train_features, calibration_features = data.features_of(train_images), data.features_of(calibration)
        train_perturbed = perturbed_sample(train_all, data.seed + 1)
        gate = cls.fit(
            train_features, calibration_features, np.concatenate([train_images, train_perturbed]), calibration
        )
        lines = []
        if data.int8_features_of is not None:
            gate.fit_int8_limit(data.int8_features_of(calibration))
            lines.append(f"gate: int8 feature limit {gate.int8_limit:.2f} (fp32 {gate.feature_limit:.2f})")
        lines.append(
            f"gate: limits: features {gate.feature_limit:.2f}, statistics {gate.statistics_limit:.2f}, "
            f"orientation {gate.orientation_limit:.2f}"
        )
        return Fitted(gate, None, lines)

    @classmethod
    def fit(
        cls,
        train_features: np.ndarray,
        calibration_features: np.ndarray,
        train_images: np.ndarray,
        calibration_images: np.ndarray,
        keep: float = KEEP,
    ) -> Gate:
        """Fit on training X-rays' features and images (for the images: clean and perturbed); set each
        limit so that ``keep`` of the calibration (validation) X-rays pass it."""
        features = FeatureScore.fit(train_features)
        train_stats, calibration_stats = image_statistics(train_images), image_statistics(calibration_images)
        films = len(train_features)  # the independent training films; the other images are perturbed copies
        statistics = Mahalanobis.fit(train_stats, films)
        layout = Mahalanobis.fit(train_stats[:, LAYOUT], films)
        low, high = np.quantile(calibration_stats, WARN_QUANTILES, axis=0)
        gate = cls(features, math.inf, statistics, math.inf, layout, math.inf, low, high)
        gate.feature_limit = keeping(features.score(calibration_features), keep)
        gate.statistics_limit = keeping(statistics.score(calibration_stats), keep)
        gate.orientation_limit = keeping(gate._orientation(calibration_stats)[0], keep)
        return gate

    def fit_int8_limit(self, calibration_features: np.ndarray, keep: float = KEEP) -> None:
        """The feature limit for an int8 model, from its features of the same calibration X-rays."""
        self.int8_limit = keeping(self.features.score(calibration_features), keep)

    def _orientation(self, stats: np.ndarray) -> tuple[np.ndarray, list[tuple[int, bool]]]:
        """How much better the layout fits after the best other turn (ratio), and that turn."""
        grids = stats[:, LAYOUT].reshape(-1, GRID, GRID)
        as_given = self.layout.score(grids.reshape(len(grids), -1))
        turned = np.stack(
            [
                self.layout.score((np.rot90(grids, -k, axes=(1, 2)) * (-1 if inverted else 1)).reshape(len(grids), -1))
                for k, inverted in TURNS
            ],
            axis=1,
        )
        best = turned.argmin(axis=1)
        return as_given / np.maximum(turned.min(axis=1), 1e-9), [TURNS[b] for b in best]

    def check(self, images: np.ndarray, features: np.ndarray, engine: str = "onnx") -> list[Verdict]:
        """The verdict on each prepared uint8 image ``(N, S, S)`` given its pooled ``features`` from
        ``engine`` (a :class:`pneumoscan.inference` engine name: torch, onnx, onnx-int8)."""
        stats = self._statistics(images)
        feature_limit = self.int8_limit if engine == "onnx-int8" and self.int8_limit else self.feature_limit
        ratio, turns = self._orientation(stats)
        parts = np.stack(
            [
                self.features.score(features) / feature_limit,
                self.statistics.score(stats) / self.statistics_limit,
                ratio / self.orientation_limit,
            ],
            axis=1,
        )
        parts = np.where(np.isfinite(parts), parts, np.inf)
        verdicts = []
        for image, row, part, turn, s in zip(images, stats, parts, turns, parts.max(axis=1)):
            if s <= LIMIT:
                verdicts.append(Verdict(float(s), None, self.warnings(row)))
            elif part[2] > LIMIT and self._fits_once_turned(image, turn):
                verdicts.append(Verdict(float(s), f"it looks {_turn_name(*turn)}"))
            else:
                verdicts.append(Verdict(float(s), "; ".join(self.warnings(row)) or PART_REASONS[int(part.argmax())]))
        return verdicts

    def verdicts(self, images: np.ndarray, features: np.ndarray, engine: str, chroma=None) -> list[Verdict]:
        """:meth:`check`, and the colour warning on accepted inputs whose ``chroma`` (colourfulness before
        they became grey, :func:`images.prepare_with_chroma`) is over :data:`COLOUR_LIMIT`."""
        verdicts = self.check(images, features, engine)
        for verdict, c in zip(verdicts, chroma if chroma is not None else []):
            if verdict.accepted and c > COLOUR_LIMIT:
                verdict.warnings.insert(0, COLOUR_WARNING)
        return verdicts

    def apply(self, batch: Batch) -> list[dict]:
        """Score and limit for every input; a refusal (with ``batch.gating``), else the warnings."""
        out = []
        for verdict in self.verdicts(batch.images, batch.features, batch.engine, batch.chroma):
            fields = {"gate_score": verdict.score, "gate_limit": self.limit}
            if batch.gating and not verdict.accepted:
                fields[ERROR] = refusal(verdict)
            elif verdict.warnings:
                fields["warnings"] = verdict.warnings
            out.append(fields)
        return out

    def evaluate(self, data: Evaluation) -> dict | None:
        """What the gate would refuse among labelled X-rays (the metrics count every image)."""
        if data.results is None:
            return None
        return gate_report(data.samples, np.array([r.gate_score for r in data.results]), self.limit)

    @classmethod
    def report_lines(cls, report: dict, n: int) -> list[str]:
        return [
            f"input gate (limit {report['limit']:.1f}): {report['refused']} of {n} would be refused "
            f"({report['refused_normal']} NORMAL, {report['refused_pneumonia']} PNEUMONIA); "
            "the metrics count every image"
        ]

    def _fits_once_turned(self, image: np.ndarray, turn: tuple[int, bool]) -> bool:
        """Whether the image, turned back, has the statistics of a chest X-ray (then the turn is named)."""
        k, inverted = turn
        turned = np.rot90(255 - image if inverted else image, -k)[None]
        return bool(self.statistics.score(self._statistics(turned))[0] <= self.statistics_limit)

    def _statistics(self, images: np.ndarray) -> np.ndarray:
        """The image statistics this gate was fitted on (a gate of an earlier format, the first ones)."""
        return image_statistics(images)[:, : len(self.statistics.mean)]

    def warnings(self, stats: np.ndarray) -> list[str]:
        """Named statistics of one image beyond every validation X-ray, as short warnings."""
        out: list[str] = []
        for name, side, text in WARNINGS:
            i = STATISTICS.index(name)
            beyond = stats[i] > self.warn_high[i] if side == "high" else stats[i] < self.warn_low[i]
            if beyond and text not in out:
                out.append(text)
        return out

    def to_bytes(self) -> bytes:
        """The gate as a safetensors file's bytes (a bundle's ``gate.safetensors``)."""
        from safetensors.numpy import save

        scalars = [self.feature_limit, self.statistics_limit, self.orientation_limit, self.int8_limit or 0.0]
        arrays = {
            "mean": self.features.mean,
            "components": self.features.components,
            "scale": self.features.scale,
            "residual_scale": np.array([self.features.residual_scale]),
            "limits": np.array(scalars),
            "statistics_mean": self.statistics.mean,
            "statistics_whiten": self.statistics.whiten,
            "layout_mean": self.layout.mean,
            "layout_whiten": self.layout.whiten,
            "warn_low": self.warn_low,
            "warn_high": self.warn_high,
        }
        arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()}  # save writes raw buffers
        return save(arrays, metadata={"format": self.format})

    @property
    def format(self) -> str:
        """The gate format of its statistics (one fitted by an earlier version keeps its own)."""
        return next(f for f, d in STATISTICS_BY_FORMAT.items() if d == len(self.statistics.mean))

    @classmethod
    def load(cls, path: Path, n_features: int | None = None) -> Gate:
        """A gate from its file, or one line saying why it cannot be one (format, shapes, finiteness)."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), "numpy") as f:
                version = (f.metadata() or {}).get("format")
                a = {key: f.get_tensor(key).astype(np.float64) for key in f.keys()}
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"{path}: not a readable gate ({type(exc).__name__})") from None
        if version not in STATISTICS_BY_FORMAT:
            raise ConfigError(
                f"{path}: gate format {str(version)[:60]!r}, expected {FORMAT!r} (fit it again: pneumoscan heads fit)"
            )
        try:
            gate = cls._from_arrays(a, STATISTICS_BY_FORMAT[version])
        except (KeyError, ValueError, IndexError):
            raise ConfigError(f"{path}: gate arrays have the wrong shapes or values") from None
        if n_features is not None and gate.features.mean.shape[0] != n_features:
            raise ConfigError(f"{path}: gate arrays have the wrong shapes or values")
        return gate

    @classmethod
    def _from_arrays(cls, a: dict[str, np.ndarray], d: int) -> Gate:
        g = GRID * GRID
        mean, components, scale = a["mean"], a["components"], a["scale"]
        limits, residual = a["limits"], a["residual_scale"]
        shapes = [
            mean.ndim == 1 and components.ndim == 2 and components.shape[1] == mean.shape[0],
            scale.shape == (components.shape[0],) and residual.shape == (1,) and limits.shape == (4,),
            a["statistics_mean"].shape == (d,) and a["statistics_whiten"].shape == (d, d),
            a["layout_mean"].shape == (g,) and a["layout_whiten"].shape == (g, g),
            a["warn_low"].shape == (d,) and a["warn_high"].shape == (d,),
        ]
        finite = all(np.isfinite(v).all() for v in a.values())
        if not all(shapes) or not finite or (scale <= 0).any() or residual[0] <= 0 or (limits[:3] <= 0).any():
            raise ValueError("shapes or values")
        return cls(
            FeatureScore(mean, components, scale, float(residual[0])),
            float(limits[0]),
            Mahalanobis(a["statistics_mean"], a["statistics_whiten"]),
            float(limits[1]),
            Mahalanobis(a["layout_mean"], a["layout_whiten"]),
            float(limits[2]),
            a["warn_low"],
            a["warn_high"],
            float(limits[3]) if limits[3] > 0 else None,
        )


def refusal(verdict: Verdict) -> str:
    """The error of a refused input (its path stands beside it, in the result and on the error line)."""
    why = f": {verdict.reason}" if verdict.reason else ""
    return f"{REFUSAL}{why} (gate score {verdict.score:.2f}, limit {LIMIT:.0f})"


def gate_report(samples: list, scores: np.ndarray, limit: float) -> dict:
    """What the input gate would refuse among these labelled X-rays (metrics above count every image)."""
    from pneumoscan.core.labels import CLASSES

    refused = [i for i, s in enumerate(scores) if s > limit]
    by_class = {c.lower(): sum(samples[i].label == n for i in refused) for n, c in enumerate(CLASSES)}
    return {
        "limit": limit,
        "refused": len(refused),
        **{f"refused_{c}": n for c, n in by_class.items()},
        "refused_share": len(refused) / max(len(samples), 1),
        "refused_files": [str(samples[i].path) for i in refused],
        "score_median": float(np.median(scores)) if len(scores) else None,
    }


def gate_images(train_images: np.ndarray, val_images: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The gate's training sample and its calibration set (validation X-rays, clean and perturbed)."""
    pick = _seeded_pick(len(train_images), TRAIN_IMAGES, seed)
    return np.asarray(train_images[pick]), calibration_images(val_images, seed)


def calibration_images(val_images: np.ndarray, seed: int = 0) -> np.ndarray:
    """What the gate's limits are set on: validation X-rays, clean and perturbed."""
    return np.concatenate([val_images, perturbed_sample(val_images, seed)])


def perturbed_sample(images: np.ndarray, seed: int, count: int = PERTURBED_IMAGES) -> np.ndarray:
    """``count`` of ``images`` (seeded) under every acquisition perturbation."""
    from pneumoscan.io.shift import perturb

    sample = _seeded_pick(len(images), count, seed)
    return np.concatenate(list(perturb(np.asarray(images[sample]), seed).values()))


def _seeded_pick(n: int, count: int, seed: int) -> np.ndarray:
    """``min(count, n)`` distinct indices below ``n``, sorted, drawn with ``seed``."""
    return np.sort(np.random.default_rng(seed).choice(n, min(count, n), replace=False))
