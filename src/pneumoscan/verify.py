"""``pneumoscan verify``: check that a bundle's ONNX models compute what its weights compute.

A bundle is as trusted as code. The sha256 digests in config.json prove only that the files are the
ones the bundle's author recorded, and the weights digest in an ONNX model's metadata is a string that
anyone editing the graph can copy. What a received bundle can be checked against is its weights: this
runs PyTorch on ``model.safetensors`` and ONNX Runtime on every ONNX model the bundle holds, over the
bundled reference X-rays (``pneumoscan/examples``), and compares logits and pooled features (which the
input gate and the subtype head read). An int8 model differs from its weights by quantisation, so its
tolerance is wider: it catches an edited graph, not a small deliberate nudge.

A head-only bundle (a frozen DINOv2 with a fitted head) ships its backbone only as an int8 graph, and its
head was fitted on that graph's features: its logits are checked against its head on those features
(exactly), and its features against the registry's float32 backbone (within quantisation).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError, require_train_extra
from .options import VerifyOptions
from .settings import DECLARED, declared

EXAMPLES = Path(__file__).parent / "examples"
# Largest differences from PyTorch accepted, per engine: |logit| on any image, |mean logit| (a shift
# of every answer), and relative L2 error of the pooled features. Measured on the bundled model over
# the reference images: fp32 below 1e-4; int8 0.76, 0.38 and 0.20. A head-only bundle's logits against its
# head on the graph's features, its features against float32: the default's DINOv2 member 6e-6 and 0.11.
TOLERANCE = {
    "onnx": {"logit": 0.01, "mean_logit": 0.005, "features": 0.001},
    "onnx-int8": {"logit": 1.5, "mean_logit": 1.0, "features": 0.4},
    "head-only": {"logit": 0.01, "mean_logit": 0.005, "features": 0.4},
}


@dataclass
class EngineCheck:
    """How one ONNX model of a bundle agrees with PyTorch on the bundle's weights."""

    engine: str
    path: Path
    images: int
    max_logit: float  # largest |logit difference| on one image (head-only: from the head on its features)
    mean_logit: float  # mean signed logit difference
    max_features: float  # largest relative L2 error of the pooled features
    labels_agree: int  # images given the same label at the bundle's threshold
    tolerance: dict

    @property
    def ok(self) -> bool:
        t = self.tolerance
        return (
            self.max_logit <= t["logit"]
            and abs(self.mean_logit) <= t["mean_logit"]
            and self.max_features <= t["features"]
        )


def reference_images() -> list[Path]:
    """The bundled reference X-rays (8 NORMAL, 8 PNEUMONIA from the official Kermany val split)."""
    return sorted(p for p in EXAMPLES.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))


@declared(VerifyOptions, "model")
def verify_bundle(model: str | Path | None = DECLARED) -> list[EngineCheck]:
    """Compare every ONNX model of the bundle (the packaged default when ``model`` is None) with PyTorch
    on its weights over the reference images; an empty list when the bundle holds no ONNX model."""
    from .bundle import load_bundle
    from .ensemble import Ensemble

    require_train_extra("pneumoscan verify (it runs the weights with PyTorch)")
    bundle = load_bundle(model)
    if isinstance(bundle, Ensemble):  # each member against its own weights (its config is pinned by the ensemble's)
        return [
            dataclasses.replace(check, engine=f"{name}:{check.engine}")
            for name, member in zip(bundle.member_names, bundle.members)
            for check in _verify_single(member)
        ]
    return _verify_single(bundle)


def _verify_single(bundle) -> list[EngineCheck]:
    from .bundle import dense_head_logits
    from .images import prepare
    from .inference import OnnxEngine, TorchEngine

    onnx_files = list(dict.fromkeys(p for p in (bundle.onnx_path(False), bundle.onnx_path(True)) if p is not None))
    if not onnx_files:
        return []
    files = reference_images()
    if not files:
        raise ConfigError(f"{EXAMPLES}: no reference images in this install")
    images = np.stack([prepare(f, bundle.preprocessing) for f in files])
    torch_logits, torch_features = (np.asarray(a, np.float64) for a in TorchEngine(bundle).run(images))
    head = bundle.head_weights() if bundle.head_only else None
    if bundle.head_only and head is None:
        raise ConfigError(f"{bundle.path}: a head-only bundle without a dense head cannot be checked")
    checks = []
    for path in onnx_files:
        engine = OnnxEngine(path, bundle)
        logits, features = (np.asarray(a, np.float64) for a in engine.run(images))
        if head is not None:  # the head was fitted on this int8 graph's features
            reference, tolerance = dense_head_logits(head, features), TOLERANCE["head-only"]
        else:
            reference, tolerance = torch_logits, TOLERANCE.get(engine.name, TOLERANCE["onnx-int8"])
        difference = logits - reference
        scale = np.maximum(np.linalg.norm(torch_features, axis=1), 1e-12)
        labels = [bundle.probabilities(x) >= bundle.threshold for x in (logits, reference)]
        checks.append(
            EngineCheck(
                engine=engine.name,
                path=path,
                images=len(files),
                max_logit=float(np.abs(difference).max()),
                mean_logit=float(difference.mean()),
                max_features=float((np.linalg.norm(features - torch_features, axis=1) / scale).max()),
                labels_agree=int((labels[0] == labels[1]).sum()),
                tolerance=tolerance,
            )
        )
    return checks


def verify_table(checks: list[EngineCheck]) -> str:
    """One row per ONNX model (per member of an ensemble): its differences from PyTorch, the tolerances
    and the verdict."""
    width = max([10, *(len(c.engine) for c in checks)])
    head = (
        f"{'engine':<{width}} {'images':>6} {'max |dlogit|':>12} {'mean dlogit':>11} {'features':>9} "
        f"{'labels':>7}  verdict"
    )
    rows = [head]
    for c in checks:
        t = c.tolerance
        verdict = "ok" if c.ok else "FAIL"
        rows.append(
            f"{c.engine:<{width}} {c.images:>6} {c.max_logit:>12.4f} {c.mean_logit:>+11.4f} {c.max_features:>9.4f} "
            f"{c.labels_agree:>3}/{c.images:<3}  {verdict} (within {t['logit']:g}, {t['mean_logit']:g}, "
            f"{t['features']:g})"
        )
    return "\n".join(rows)
