"""Fit the bacterial/viral head for an existing bundle, as training now does, and write it into the bundle.

    python benchmarks/add_subtype.py [--model BUNDLE] [--data ../shared/data/chest_xray_224]

On the pneumonia images of the bundle's training data and validation patients (carved from train by
patient with its recipe's seed and fraction); the test split is not opened. The pneumonia head and its
weights are untouched. Used once for the bundled model, which was trained before the head existed.
"""

from __future__ import annotations

import argparse

import numpy as np

from pneumoscan import metrics as M
from pneumoscan.bundle import SUBTYPE, WEIGHTS, load_bundle, write_bundle
from pneumoscan.data import load_images
from pneumoscan.inference import Classifier
from pneumoscan.subtype import SUBTYPES, SubtypeHead


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="bundle folder (default: the bundled model)")
    parser.add_argument("--data", default="../shared/data/chest_xray_224", help="the bundle's training data root")
    args = parser.parse_args()
    bundle = load_bundle(args.model)
    clf = Classifier(bundle)
    train, val = bundle.training_splits(args.data)
    parts = []
    for samples in (train, val):
        known = [s for s in samples if s.label == 1 and s.subtype in SUBTYPES]
        images, known, _ = load_images(known, bundle.image_size)
        parts.append((clf.outputs(images)[1], np.array([s.subtype == SUBTYPES[1] for s in known], int), known))
    (f_train, y_train, _), (f_val, y_val, val_known) = parts
    head = SubtypeHead.fit(f_train, y_train, f_val, y_val)
    report = M.subtype_report(
        y_val, head.viral_probability(f_val), [s.patient for s in val_known], head.threshold, split="validation"
    )
    metrics = {**bundle.metrics, "validation": {**bundle.metrics["validation"], "subtype": report}}
    write_bundle(bundle.path, bundle.config, metrics, weights=bundle.path / WEIGHTS, files={SUBTYPE: head.to_bytes()})
    print(
        f"subtype head written ({len(y_train)} training pneumonia images, {y_train.sum()} viral); validation "
        f"AUC {report['auc']:.3f}, accuracy {report['accuracy']:.3f}, threshold {head.threshold:.3f}, "
        f"temperature {head.temperature:.3f}"
    )


if __name__ == "__main__":
    main()
