"""Full-resolution films against their 224 px copies: does a hospital's original get the answer every published
number was measured on?

The 64 pairs: the 48 full-resolution samples of ``fullres_sample/`` (official train split) and the 16 official val
films of ``val_fullres/``, each against its copy in ``chest_xray_224/`` (Pillow bilinear to 224 px, JPEG quality
75). Both go through the real pipeline (``Classifier.predict`` on the files, gate off), per model and engine:
mean and largest |p(original) - p(copy)|, labels that flip, flips of films whose copy is further than 0.05 from the
threshold, and how many originals score lower. ``--raw`` also prints the same without the bundle's JPEG round trip
(what the model said before the preprocessing was recorded).

    python benchmarks/fullres_skew.py [--model default --model runs/x/model] [--raw]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import numpy as np
from harness import table

from pneumoscan.inference.classifier import Classifier

DATA = Path(os.environ.get("PNEUMOSCAN_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
MUST = {"mean": 0.005, "largest": 0.05, "flips": 1}
ENGINES = {
    "onnx fp32": {"engine": "onnx", "fp32": True},
    "onnx int8": {"engine": "onnx", "int8": True},
    "torch": {"engine": "torch"},
}


def pairs() -> list[tuple[Path, Path]]:
    """(full-resolution original, its 224 px copy) for the 64 films."""
    out = []
    for folder, split in (("fullres_sample", "train"), ("val_fullres", "val")):
        for original in sorted((DATA / folder).rglob("*.jpeg")):
            out.append((original, DATA / "chest_xray_224" / split / original.parent.name / original.name))
    missing = [str(c) for _, c in out if not c.is_file()]
    if missing or len(out) != 64:
        raise SystemExit(f"expected 64 pairs under {DATA}; missing copies: {missing[:3]}")
    return out


def skew(clf: Classifier, films: list[tuple[Path, Path]]) -> dict:
    originals = np.array([r.probability for r in clf.predict([o for o, _ in films], gate=False)])
    copies = np.array([r.probability for r in clf.predict([c for _, c in films], gate=False)])
    diff = np.abs(originals - copies)
    flips = (originals >= clf.threshold) != (copies >= clf.threshold)
    far = np.abs(copies - clf.threshold) > 0.05
    return {
        "mean": float(diff.mean()),
        "largest": float(diff.max()),
        "flips": int(flips.sum()),
        "far flips": int((flips & far).sum()),
        "lower": int((originals < copies).sum()),
    }


def meets(row: dict) -> bool:
    return (
        row["mean"] <= MUST["mean"]
        and row["largest"] <= MUST["largest"]
        and row["flips"] <= MUST["flips"]
        and row["far flips"] == 0
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="bundle folder or bundled name (repeatable; default: default)")
    parser.add_argument("--raw", action="store_true", help="also without the JPEG round trip")
    args = parser.parse_args()
    films = pairs()
    rows = []
    for model in args.model or ["default"]:
        for engine, options in ENGINES.items():
            clf = Classifier.load(model, gate=False, **options)
            variants = [("recorded", clf)]
            if args.raw:
                raw = dataclasses.replace(clf.bundle.preprocessing, jpeg_quality=None)
                clf_raw = Classifier.load(model, gate=False, **options)
                clf_raw.bundle.config["preprocessing"] = raw.record()
                variants.append(("resize only", clf_raw))
            for label, c in variants:
                r = skew(c, films)
                rows.append(
                    [
                        c.bundle.name,
                        engine,
                        label,
                        f"{r['mean']:.4f}",
                        f"{r['largest']:.3f}",
                        f"{r['flips']} of 64",
                        r["far flips"],
                        f"{r['lower']} of 64",
                        "yes" if meets(r) else "no",
                    ]
                )
                print(" | ".join(map(str, rows[-1])), flush=True)
    headers = [
        "model",
        "engine",
        "preprocessing",
        "mean |dp|",
        "largest",
        "flips",
        "far flips",
        "original lower",
        "must",
    ]
    print()
    print(f"must: mean <= {MUST['mean']}, largest <= {MUST['largest']}, at most {MUST['flips']} flip, no far flip")
    print(table(headers, rows))


if __name__ == "__main__":
    main()
