"""``pneumoscan verify``: check that a bundle's ONNX models compute what its weights compute.

A bundle is as trusted as code. The sha256 digests in config.json prove only that the files are the
ones the bundle's author recorded, and the weights digest in an ONNX model's metadata is a string that
anyone editing the graph can copy. What a received bundle can be checked against is its weights, so
verify does two things for every ONNX model of a bundle:

- **rebuilds it here from the weights** (the same export and quantisation ``pneumoscan export`` runs; a
  head-only bundle's int8 backbone graph from the registry's pinned weights) and compares the two graphs
  node by node (:mod:`.onnx_compare`): operators, wiring and every weight exactly. An edit of any kind (a
  constant added to the features, a trigger on some property of the input) is a graph that differs. The
  one thing a rebuild cannot reproduce is a static int8 model's calibration (its activation ranges come
  from training images): those are held within bounds of what the reference X-rays need, and said so.
- **runs both engines** on the bundled reference X-rays (``pneumoscan/examples``) and on probe images made
  at verify time from a fresh random seed (perturbed films and synthetic inputs), comparing logits and
  pooled features with PyTorch on the weights (a head-only bundle: with its float32 backbone and its head).
"""

from __future__ import annotations

import dataclasses
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumoscan.core.errors import ConfigError, require_train_extra
from pneumoscan.core.options import VerifyOptions
from pneumoscan.core.package import PACKAGE
from pneumoscan.core.settings import DECLARED, declared

EXAMPLES = PACKAGE / "examples"
PROBES = 16  # probe images per run, besides the 16 reference X-rays
# Largest differences from PyTorch accepted, per engine, over the reference and probe images: |logit| on
# any image, |mean logit| (a shift of every answer), and relative L2 error of the pooled features. These are
# the second line of defence (the graph comparison is the proof): quantisation error is large on inputs unlike
# X-rays (a flat grey image), and a head-only bundle's head, fitted on its int8 graph's features, amplifies it.
# Measured over 20 seeds (336 images): the bundled model's fp32 graph below 1e-4; its int8 graph 1.87, 0.33 and
# 0.55 (0.66, 0.33 and 0.18 on the reference X-rays alone); the head-only DINOv2 test bundle 1.02, 0.15 and 0.21.
TOLERANCE = {
    "onnx": {"logit": 0.01, "mean_logit": 0.005, "features": 0.001},
    "onnx-int8": {"logit": 2.5, "mean_logit": 0.6, "features": 0.75},
    "head-only": {"logit": 1.5, "mean_logit": 0.3, "features": 0.3},
}
NOT_PROVEN = {
    "onnx-int8": "its activation ranges come from the images it was calibrated on, which a rebuild does not "
    "have; each is only held to cover at least {cover} of the range the reference X-rays need and to be at most "
    "{range:g} times as wide",
    "weights": "the weights themselves: verify proves the graphs compute what model.safetensors computes, not "
    "that it is a good model (evaluate it on your own labelled images)",
}


@dataclass
class EngineCheck:
    """How one ONNX model of a bundle agrees with the graph rebuilt from its weights and with PyTorch."""

    engine: str
    path: Path
    images: int  # reference X-rays
    probes: int  # probe images made at verify time
    seed: int  # the seed they were made from
    max_logit: float  # largest |logit difference| from PyTorch on one image
    mean_logit: float  # mean signed logit difference
    max_features: float  # largest relative L2 error of the pooled features
    labels_agree: int  # images given the same label at the bundle's threshold
    tolerance: dict
    graph: str | None = None  # how the graph differs from the one rebuilt from the weights; None: it does not
    not_proven: tuple[str, ...] = ()  # what the rebuild could not reproduce, in words

    @property
    def ok(self) -> bool:
        t = self.tolerance
        return (
            self.graph is None
            and self.max_logit <= t["logit"]
            and abs(self.mean_logit) <= t["mean_logit"]
            and self.max_features <= t["features"]
        )

    @property
    def problems(self) -> list[str]:
        """What failed, in words (empty when ``ok``)."""
        t, found = self.tolerance, []
        if self.graph is not None:
            found.append(f"not the graph its weights export to ({self.graph})")
        if self.max_logit > t["logit"] or abs(self.mean_logit) > t["mean_logit"]:
            found.append(f"logits differ from PyTorch's by up to {self.max_logit:.3g} (mean {self.mean_logit:+.3g})")
        if self.max_features > t["features"]:
            found.append(f"features differ from PyTorch's by {self.max_features:.3g} (relative L2)")
        return found


def reference_images() -> list[Path]:
    """The bundled reference X-rays (8 NORMAL, 8 PNEUMONIA from the official Kermany val split)."""
    return sorted(p for p in EXAMPLES.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))


def probe_images(films: np.ndarray, seed: int, count: int = PROBES) -> np.ndarray:
    """``count`` uint8 images like ``films`` (N, S, S), made from ``seed``: three in four a film shifted,
    zoomed, flipped, with its contrast, brightness and gamma changed and noise added; the rest synthetic
    (a flat grey, a gradient, noise, smooth blobs). No two runs of verify use the same ones, so a graph that
    behaves only on the reference X-rays cannot know which inputs it will be asked about."""
    rng = np.random.default_rng(seed)
    size = films.shape[-1]
    made = [_perturbed(films[rng.integers(len(films))], rng) for _ in range(count - count // 4)]
    made += [_synthetic(size, rng, kind) for kind in range(count // 4)]
    return np.stack(made)


def _perturbed(film: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = film.shape[-1]
    zoom = rng.uniform(0.75, 1.0)
    crop = int(size * zoom)
    y, x = rng.integers(0, size - crop + 1, size=2)
    rows = y + (np.arange(size) * crop // size)
    cols = x + (np.arange(size) * crop // size)
    image = film[np.ix_(rows, cols)].astype(np.float64)
    if rng.random() < 0.5:
        image = image[:, ::-1]
    image = 255 * (image / 255) ** rng.uniform(0.6, 1.6)
    image = rng.uniform(0.6, 1.3) * (image - 128) + 128 + rng.uniform(-40, 40)
    image += rng.normal(0, rng.uniform(0, 12), image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _synthetic(size: int, rng: np.random.Generator, kind: int) -> np.ndarray:
    if kind % 4 == 0:
        image = np.full((size, size), rng.uniform(0, 255))
    elif kind % 4 == 1:
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[:size, :size] / size
        image = 255 * ((np.cos(angle) * xx + np.sin(angle) * yy) % 1.0)
    elif kind % 4 == 2:
        image = rng.uniform(0, 255, (size, size))
    else:
        coarse = rng.uniform(0, 255, (8, 8))
        image = np.kron(coarse, np.ones((size // 8 + 1, size // 8 + 1)))[:size, :size]
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


@declared(VerifyOptions, "model")
def verify_bundle(model: str | Path | None = DECLARED, seed: int | None = None) -> list[EngineCheck]:
    """Rebuild every ONNX model of the bundle (the packaged default when ``model`` is None) from its weights
    and compare the graphs, then compare both engines over the reference X-rays and probe images made
    from ``seed`` (a fresh random one by default); an empty list when the bundle holds no ONNX model."""
    from pneumoscan.model.ensemble import Ensemble
    from pneumoscan.model.store import load_bundle

    require_train_extra("pneumoscan verify (it runs the weights with PyTorch)")
    bundle = load_bundle(model)
    seed = secrets.randbits(32) if seed is None else seed
    if isinstance(bundle, Ensemble):  # each member against its own weights (its config is pinned by the ensemble's)
        return [
            dataclasses.replace(check, engine=f"{name}:{check.engine}")
            for name, member in zip(bundle.member_names, bundle.members)
            for check in _verify_single(member, seed)
        ]
    return _verify_single(bundle, seed)


def _verify_single(bundle, seed: int) -> list[EngineCheck]:
    from pneumoscan.inference.engines import OnnxEngine, TorchEngine
    from pneumoscan.io.images import prepare

    onnx_files = list(dict.fromkeys(p for p in (bundle.onnx_path(False), bundle.onnx_path(True)) if p is not None))
    if not onnx_files:
        return []
    files = reference_images()
    if not files:
        raise ConfigError(f"{EXAMPLES}: no reference images in this install")
    if bundle.head_only and bundle.head_weights() is None:
        raise ConfigError(f"{bundle.path}: a head-only bundle without a dense head cannot be checked")
    films = np.stack([prepare(f, bundle.preprocessing) for f in files])
    images = np.concatenate([films, probe_images(films, seed)])
    torch_logits, torch_features = (np.asarray(a, np.float64) for a in TorchEngine(bundle).run(images))
    scale = np.maximum(np.linalg.norm(torch_features, axis=1), 1e-12)
    checks = []
    with tempfile.TemporaryDirectory(prefix="pneumoscan-verify-") as tmp:
        rebuilt = _rebuild(bundle, onnx_files, films, Path(tmp))
        for path in onnx_files:
            engine = OnnxEngine(path, bundle)
            kind = "head-only" if bundle.head_only else engine.name
            logits, features = (np.asarray(a, np.float64) for a in engine.run(images))
            difference = logits - torch_logits
            labels = [bundle.probabilities(x) >= bundle.threshold for x in (logits, torch_logits)]
            checks.append(
                EngineCheck(
                    engine=engine.name,
                    path=path,
                    images=len(films),
                    probes=len(images) - len(films),
                    seed=seed,
                    max_logit=float(np.abs(difference).max()),
                    mean_logit=float(difference.mean()),
                    max_features=float((np.linalg.norm(features - torch_features, axis=1) / scale).max()),
                    labels_agree=int((labels[0] == labels[1]).sum()),
                    tolerance=TOLERANCE.get(kind, TOLERANCE["onnx-int8"]),
                    graph=_graph_difference(path, rebuilt[path], calibrated=_statically_quantised(bundle, path)),
                    not_proven=_not_proven(bundle, path),
                )
            )
    return checks


def _statically_quantised(bundle, path: Path) -> bool:
    from pneumoscan.model.schema import ONNX_INT8

    return path.name == ONNX_INT8 and not bundle.head_only


def _rebuild(bundle, onnx_files: list[Path], films: np.ndarray, folder: Path) -> dict[Path, Path]:
    """Each of ``onnx_files`` made again from the bundle's weights into ``folder``: the fp32 export, the
    static int8 model calibrated on ``films`` (its calibration-dependent values are compared within bounds),
    a head-only bundle's int8 backbone graph from the registry's weights followed by its head."""
    from pneumoscan.model.onnx_export import export_onnx, quantize_int8
    from pneumoscan.model.schema import ONNX

    fp32 = export_onnx(bundle, folder / ONNX)
    return {
        path: quantize_int8(bundle, fp32, films, folder / path.name) if _statically_quantised(bundle, path) else fp32
        for path in onnx_files
    }


def _graph_difference(given: Path, rebuilt: Path, calibrated: bool) -> str | None:
    import onnx

    from pneumoscan.model.onnx_compare import graph_difference

    try:
        model = onnx.load(str(given))
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime loaded it; the onnx package may still refuse it
        return f"the onnx package cannot read it: {str(exc).splitlines()[0][:150]}"
    return graph_difference(model, onnx.load(str(rebuilt)), calibrated)


def _not_proven(bundle, path: Path) -> tuple[str, ...]:
    from pneumoscan.model.onnx_compare import CALIBRATION

    if _statically_quantised(bundle, path):
        return (NOT_PROVEN["onnx-int8"].format(**CALIBRATION),)
    return ()


def verify_table(checks: list[EngineCheck]) -> str:
    """One row per ONNX model (per member of an ensemble): whether it is the graph rebuilt from the weights,
    its differences from PyTorch, the tolerances and the verdict; then one line for each thing not proven."""
    width = max([10, *(len(c.engine) for c in checks)])
    head = (
        f"{'engine':<{width}} {'images':>6} {'graph':>8} {'max |dlogit|':>12} {'mean dlogit':>11} {'features':>9} "
        f"{'labels':>7}  verdict"
    )
    rows = [head]
    for c in checks:
        t = c.tolerance
        verdict = "ok" if c.ok else "FAIL"
        count = c.images + c.probes
        rows.append(
            f"{c.engine:<{width}} {count:>6} {'same' if c.graph is None else 'DIFFERS':>8} {c.max_logit:>12.4f} "
            f"{c.mean_logit:>+11.4f} {c.max_features:>9.4f} {c.labels_agree:>3}/{count:<3}  {verdict} (within "
            f"{t['logit']:g}, {t['mean_logit']:g}, {t['features']:g})"
        )
    if checks:
        c = checks[0]
        rows.append(f"images: {c.images} reference X-rays and {c.probes} probe images made from seed {c.seed}")
    for c in checks:
        rows.extend(f"not proven: {c.engine}: {line}" for line in c.not_proven)
    rows.append(f"not proven: {NOT_PROVEN['weights']}")
    return "\n".join(rows)
