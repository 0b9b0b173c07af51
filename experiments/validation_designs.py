"""How held-out designs carved from train rank the models already read on test (r1, r2, r11).

    PYTHONPATH=src python experiments/validation_designs.py --model r1=RUNS/r1 --model r2=RUNS/r2 --model r11=RUNS/r11

Designs (all from the official train split only):
- ``patients``: 10% of the patients of each class at random (seed 0): the split r1, r2 and r11 were
  trained with, so all 525 images are unseen by them.
- ``temporal``: the 20% of patients with the highest file numbers in each series (``IM-``,
  ``NORMAL2-IM-``, ``person``). r1, r2 and r11 trained on most of these images; they are scored only on
  the part they never saw (``temporal & patients``: 75 images, 23 normal).

Each model's logits on the ``patients`` images are cached (npz) in ``--out`` for the ensembles of
``candidates.py``. Prints one markdown table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pneumoscan import Classifier
from pneumoscan.core import metrics as M
from pneumoscan.io.dataset import load_images, load_split, shared_data_root, split_by_number, split_by_patient


def designs(root: Path) -> dict[str, list]:
    """The held-out sets, each a list of samples of the official train split."""
    train = load_split(root, "train")
    _, patients = split_by_patient(train, 0.1, 0)
    _, temporal = split_by_number(train, 0.2)
    in_patients = {s.patient for s in patients}
    return {
        "patients": patients,
        "temporal": temporal,
        "temporal & patients": [s for s in temporal if s.patient in in_patients],
    }


def summary(y: np.ndarray, p: np.ndarray) -> dict:
    m = M.binary_metrics(y, p, 0.5)
    return {k: m[k] for k in ("n", "n_normal", "auc", "loss", "accuracy", "sensitivity", "specificity")}


def model_logits(name: str, path: str, samples: list, out: Path) -> np.ndarray:
    """The model's calibrated-temperature logits on ``samples`` (cached by model name)."""
    cached = out / f"{name}-patients.npz"
    if cached.is_file():
        stored = np.load(cached, allow_pickle=False)
        assert list(stored["paths"]) == [str(s.path) for s in samples]
        return stored["logits"]
    clf = Classifier.load(path)
    images, kept, errors = load_images(samples, clf.image_size, progress=False)
    assert not errors and len(kept) == len(samples)
    logits = clf.logits(images) / clf.bundle.temperature
    np.savez(cached, logits=logits, paths=np.array([str(s.path) for s in samples]))
    return logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], help="NAME=BUNDLE of a model read on test")
    parser.add_argument("--data", type=Path, default=shared_data_root() / "chest_xray_224")
    parser.add_argument("--out", type=Path, default=Path("runs/designs"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sets = designs(args.data)
    patients = sets["patients"]
    index = {str(s.path): i for i, s in enumerate(patients)}
    print("| model | design | images (normal) | AUC | loss | accuracy | sensitivity | specificity |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in args.model:
        name, path = spec.split("=", 1)
        logits = model_logits(name, path, patients, args.out)
        for design in ("patients", "temporal & patients"):
            rows = [index[str(s.path)] for s in sets[design]]
            y = np.array([patients[i].label for i in rows])
            r = summary(y, M.sigmoid(logits[rows]))
            print(
                f"| {name} | {design} | {r['n']} ({r['n_normal']}) | {r['auc']:.4f} | {r['loss']:.4f} "
                f"| {r['accuracy']:.3f} | {r['sensitivity']:.3f} | {r['specificity']:.3f} |"
            )


if __name__ == "__main__":
    main()
