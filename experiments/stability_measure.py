"""Full-resolution vs 224-copy skew of a bundle through the real pipeline (Classifier, gate off), per engine.

Pairs: the 48 fullres_sample films (copies in chest_xray_224/train) and the 16 val_fullres films (copies in
chest_xray_224/val). Never reads chest_xray_224/test.

    PYTHONPATH=src python experiments/stability_measure.py BUNDLE [--engines onnx,int8,torch] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from pneumoscan.inference.classifier import Classifier
from pneumoscan.io.dataset import shared_data_root


def pairs(root: Path | None = None) -> list[tuple[Path, Path]]:
    root = Path(root or shared_data_root())
    out = [
        (f, root / "chest_xray_224/train" / f.parent.name / f.name)
        for f in sorted((root / "fullres_sample").rglob("*.jpeg"))
    ]
    out += [
        (f, root / "chest_xray_224/val" / f.parent.name / f.name)
        for f in sorted((root / "val_fullres").rglob("*.jpeg"))
    ]
    assert all(c.exists() for _, c in out)
    return out


def skew(bundle: str, engine: str) -> dict:
    onnx = {"engine": "onnx", "int8": engine == "int8", "fp32": engine != "int8"}
    kwargs = {"engine": "torch"} if engine == "torch" else onnx
    clf = Classifier.load(bundle, gate=False, **kwargs)
    ps = pairs()
    full = np.array([r.probability for r in clf.predict([str(f) for f, _ in ps], errors="raise")])
    copy = np.array([r.probability for r in clf.predict([str(c) for _, c in ps], errors="raise")])
    t = clf.threshold
    d = np.abs(full - copy)
    flip = (full >= t) != (copy >= t)
    far = flip & (np.abs(copy - t) > 0.05)
    return {
        "engine": engine,
        "mean_abs_dp": float(d.mean()),
        "max_abs_dp": float(d.max()),
        "flips": int(flip.sum()),
        "far_flips": int(far.sum()),
        "flipped": [
            (str(ps[i][0].name), round(float(copy[i]), 4), round(float(full[i]), 4)) for i in np.flatnonzero(flip)
        ],
        "worst": [(str(ps[i][0].name), round(float(copy[i]), 4), round(float(full[i]), 4)) for i in np.argsort(-d)[:3]],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--engines", default="onnx,int8,torch")
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = [skew(a.bundle, e) for e in a.engines.split(",")]
    for r in rows:
        print(json.dumps(r))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
