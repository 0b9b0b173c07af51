"""Does the int8 graph answer as the float32 one does? Measured on validation films and full-resolution originals.

    python benchmarks/int8_agreement.py [--model default --model runs/x/model]

Per bundle, ONNX fp32 against ONNX int8 through the real pipeline (``Classifier.predict`` on the files):
- the bundle's own validation films (patients held out of the official train split, as its recipe drew them,
  with the gate off so every film gets a probability) and the 16 official val films;
- the 64 full-resolution originals (``fullres_sample/`` and ``val_fullres/``), as hospitals send them.
Label agreement at the bundle's threshold, mean and largest |p(int8) - p(fp32)|, the AUC of each on the
validation films and its difference, and whether the input gate gives the same verdict (refused or not) on
every film. Never reads the test split.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from harness import table

from pneumoscan.core.metrics import roc_auc
from pneumoscan.inference.classifier import Classifier
from pneumoscan.io.dataset import load_split
from pneumoscan.model.store import load_bundle

DATA = Path(os.environ.get("PNEUMOSCAN_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
MUST = {"agree": 0.995, "mean": 0.005, "auc": 0.002}


def film_sets(model: str) -> dict[str, tuple[list[Path], np.ndarray | None]]:
    """name -> (files, labels or None): the bundle's validation films, the official val, the full-res originals."""
    root = DATA / "chest_xray_224"
    _, val = load_bundle(model).training_splits(root)
    official = load_split(root, "val")
    fullres = sorted((DATA / "fullres_sample").rglob("*.jpeg")) + sorted((DATA / "val_fullres").rglob("*.jpeg"))
    return {
        f"validation ({len(val)})": ([s.path for s in val], np.array([s.label for s in val])),
        f"official val ({len(official)})": ([s.path for s in official], np.array([s.label for s in official])),
        f"full-resolution ({len(fullres)})": (fullres, None),
    }


def answers(clf: Classifier, files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(probability with the gate off, refused by the gate) per file."""
    gated = clf.predict(files, gate=True)
    ungated = clf.predict(files, gate=False)
    refused = np.array(
        [r.gate_score is not None and r.gate_limit is not None and r.gate_score > r.gate_limit for r in gated]
    )
    return np.array([r.probability for r in ungated]), refused


def compare(fp32: Classifier, int8: Classifier, files: list[Path], labels: np.ndarray | None) -> dict:
    p32, refused32 = answers(fp32, files)
    p8, refused8 = answers(int8, files)
    diff = np.abs(p8 - p32)
    row = {
        "agree": float(np.mean((p8 >= fp32.threshold) == (p32 >= fp32.threshold))),
        "mean": float(diff.mean()),
        "largest": float(diff.max()),
        "gate": int((refused8 != refused32).sum()),
        "auc fp32": None,
        "auc int8": None,
    }
    if labels is not None and len(set(labels.tolist())) == 2:
        row["auc fp32"], row["auc int8"] = roc_auc(labels, p32), roc_auc(labels, p8)
    return row


def meets(row: dict) -> bool:
    auc_ok = row["auc fp32"] is None or abs(row["auc int8"] - row["auc fp32"]) <= MUST["auc"]
    return row["agree"] >= MUST["agree"] and row["mean"] <= MUST["mean"] and row["gate"] == 0 and auc_ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="bundle folder or bundled name (repeatable; default: default)")
    args = parser.parse_args()
    rows = []
    for model in args.model or ["default"]:
        fp32 = Classifier.load(model, engine="onnx", fp32=True)
        int8 = Classifier.load(model, engine="onnx", int8=True)
        for name, (files, labels) in film_sets(model).items():
            r = compare(fp32, int8, files, labels)
            auc = (
                "-"
                if r["auc fp32"] is None
                else f"{r['auc fp32']:.4f} / {r['auc int8']:.4f} ({r['auc int8'] - r['auc fp32']:+.4f})"
            )
            rows.append(
                [
                    fp32.bundle.name,
                    name,
                    f"{r['agree']:.2%}",
                    f"{r['mean']:.4f}",
                    f"{r['largest']:.3f}",
                    auc,
                    r["gate"],
                    "yes" if meets(r) else "no",
                ]
            )
            print(" | ".join(map(str, rows[-1])), flush=True)
    print()
    print(
        f"must: labels agree >= {MUST['agree']:.1%}, mean |dp| <= {MUST['mean']}, AUC within {MUST['auc']}, "
        "gate verdicts identical"
    )
    headers = [
        "model",
        "films",
        "labels agree",
        "mean |dp|",
        "largest |dp|",
        "AUC fp32 / int8",
        "gate verdicts differ",
        "must",
    ]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
