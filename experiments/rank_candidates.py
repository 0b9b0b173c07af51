"""Rank candidate models without the test split: validation, and the shift proxy of validation.

    python experiments/rank_candidates.py runs/A/model runs/B/model ... \
        [--data ../shared/data/chest_xray_224] [--detail]

The rule (fixed on 2026-11-28, before any candidate existed; see docs/research-log.md):
- each bundle is scored on the validation patients of its own recipe (carved from train by patient), clean
  and under every perturbation of ``pneumoscan.io.shift`` (seed 0, all validation images);
- its shift-proxy AUC is the worst AUC over the perturbations;
- candidates are ranked by the mean of clean-validation AUC and shift-proxy AUC; ties (within 0.0005)
  go to the lower calibrated validation loss.
Only the top-ranked candidate, and only if it beats the shipped model on that mean, is read on test.
"""

from __future__ import annotations

import argparse

import numpy as np

from pneumoscan import Classifier
from pneumoscan.core import metrics as M
from pneumoscan.io.dataset import load_images
from pneumoscan.io.shift import perturb


def score(bundle_path: str | None, data: str) -> dict:
    clf = Classifier.load(bundle_path)
    _, val = clf.bundle.training_splits(data)
    images, val, _ = load_images(val, clf.image_size, progress=False)
    y = np.array([s.label for s in val])
    p = clf.probabilities(clf.logits(images))
    shifted = {name: M.roc_auc(y, clf.probabilities(clf.logits(x))) for name, x in perturb(images, 0).items()}
    worst = min(shifted, key=shifted.get)
    auc = M.roc_auc(y, p)
    return {
        "model": clf.bundle.name if bundle_path is None else bundle_path,
        "val_auc": auc,
        "val_loss": M.log_loss(y, p),
        "shift_auc": shifted[worst],
        "worst": worst,
        "rank_score": (auc + shifted[worst]) / 2,
        "shifted": shifted,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="candidate bundles (the shipped model is always included)")
    parser.add_argument("--data", default="../shared/data/chest_xray_224", help="the candidates' training data")
    parser.add_argument("--detail", action="store_true", help="also print every model's AUC under every perturbation")
    args = parser.parse_args()
    rows = [score(None, args.data)] + [score(m, args.data) for m in args.models]
    rows.sort(key=lambda r: (-round(r["rank_score"] / 0.0005), r["val_loss"]))
    print("| model | val AUC | val loss | shift-proxy AUC (worst perturbation) | rank score |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['val_auc']:.4f} | {r['val_loss']:.4f} | {r['shift_auc']:.4f} ({r['worst']}) "
            f"| {r['rank_score']:.4f} |"
        )
    if args.detail:
        print("\n| perturbation | " + " | ".join(r["model"] for r in rows) + " |")
        print("|---|" + "---|" * len(rows))
        for name in rows[0]["shifted"]:
            print(f"| {name} | " + " | ".join(f"{r['shifted'][name]:.4f}" for r in rows) + " |")


if __name__ == "__main__":
    main()
