"""A bundle fitted on train minus P (rule 5), scored on P through its shipped ONNX model, alone and
averaged with an already-read model (docs/accuracy.md; no test images).

    PYTHONPATH=src python experiments/member_on_p.py --model RUN/model --ensemble r11=DESIGNS/r11-patients.npz

P is the bundle's own validation split (random patients, 10%, seed 0: the same images as r11's). Its
temperature and threshold were fitted there, so these are validation numbers, not held-out ones.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pneumoscan.core import metrics as M
from pneumoscan.inference.classifier import Classifier
from pneumoscan.io.dataset import load_images
from pneumoscan.model.store import load_bundle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--ensemble", action="append", default=[], help="NAME=NPZ of calibrated logits on P")
    args = parser.parse_args()
    bundle = load_bundle(args.model)
    clf = Classifier(bundle, engine="onnx", gate=False)
    images, samples, errors = load_images(bundle.training_splits()[1], bundle.image_size, progress=False)
    assert not errors
    y = np.array([s.label for s in samples])
    paths = [str(s.path) for s in samples]
    mine = clf.logits(images) / bundle.temperature
    p = M.sigmoid(mine)
    at = M.binary_metrics(y, p, bundle.threshold)
    print(f"{bundle.config['backbone']} ({clf.engine.name}) on P: {len(y)} images, {int((y == 0).sum())} normal")
    print("| model | AUC P | loss P | accuracy | sensitivity | specificity |\n|---|---|---|---|---|---|")
    print(
        f"| {args.model.name} | {M.roc_auc(y, mine):.4f} | {M.log_loss(y, p):.4f} | {at['accuracy']:.3f} "
        f"| {at['sensitivity']:.3f} | {at['specificity']:.3f} |"
    )
    for spec in args.ensemble:
        name, path = spec.split("=", 1)
        stored = np.load(path, allow_pickle=False)
        theirs = dict(zip(stored["paths"].tolist(), stored["logits"]))
        other = np.array([theirs[q] for q in paths])
        for label, logits in ((name, other), (f"mean with {name}", (mine + other) / 2)):
            q = M.sigmoid(logits)
            at = M.binary_metrics(y, q, 0.5)
            print(
                f"| {label} | {M.roc_auc(y, logits):.4f} | {M.log_loss(y, q):.4f} | {at['accuracy']:.3f} "
                f"| {at['sensitivity']:.3f} | {at['specificity']:.3f} |"
            )


if __name__ == "__main__":
    main()
