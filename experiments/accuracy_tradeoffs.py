"""What the speed-ups cost in accuracy, for the bundled model.

    python experiments/accuracy_tradeoffs.py [--model BUNDLE]

1. Reduced-scale JPEG decoding on the 48 full-resolution samples (train split): probability
   differences against a full decode, and decode+resize speed, for each draft oversampling.
2. int8 against fp32 ONNX on validation (patients held out of train, seed 0, as in training) and on
   the test split (a final report: nothing is chosen on it).
(Horizontal-flip test-time augmentation is measured per run by recipe_exploration.py table.)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import pneumoscan.io.images as images
from pneumoscan import Classifier
from pneumoscan.core import metrics as M
from pneumoscan.inference.engines import OnnxEngine
from pneumoscan.io.dataset import list_images, load_images, load_split, shared_data_root, training_splits
from pneumoscan.model.onnx_export import export_onnx


def draft_table(clf: Classifier, files: list[Path]) -> None:
    start = time.perf_counter()
    full = np.stack([clf.bundle.preprocessing.apply(images.load_image(f)) for f in files])
    full_rate = len(files) / (time.perf_counter() - start)
    p_full = clf.probabilities(clf.logits(full))
    print(f"Draft JPEG decoding, {len(files)} full-resolution files (full decode: {full_rate:.0f} img/s)")
    print("| oversampling | max abs. prob. difference | mean | labels changed | decode+resize img/s |")
    print("|---|---|---|---|---|")
    default = images.DRAFT_OVERSAMPLE
    for factor in (2, 3, 4):
        images.DRAFT_OVERSAMPLE = factor
        start = time.perf_counter()
        drafted = np.stack([images.prepare(f, clf.image_size) for f in files])
        rate = len(files) / (time.perf_counter() - start)
        p = clf.probabilities(clf.logits(drafted))
        d = np.abs(p - p_full)
        changed = int(((p >= clf.threshold) != (p_full >= clf.threshold)).sum())
        mark = " (default)" if factor == default else ""
        print(f"| {factor}x{mark} | {d.max():.4f} | {d.mean():.4f} | {changed} | {rate:.0f} |")
    images.DRAFT_OVERSAMPLE = default


def int8_table(clf: Classifier, data: Path) -> None:
    bundle = clf.bundle
    int8 = bundle.onnx_path(int8=True)
    if int8 is None:
        print("(the bundle has no int8 model: run pneumoscan export --int8)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = OnnxEngine(export_onnx(bundle, Path(tmp) / "fp32.onnx"), bundle)
        q = OnnxEngine(int8, bundle)
        _, val = training_splits(data, "patients", 0.1, 0)
        print("\nint8 against fp32 (ONNX Runtime)")
        print(
            "| split | AUC fp32 | AUC int8 | difference | accuracy fp32 | accuracy int8 | mean abs. prob. diff. | max |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for name, samples in (("validation", val), ("test", load_split(data, "test"))):
            x, kept, _ = load_images(samples, bundle.image_size, progress=False)
            y = np.array([s.label for s in kept])
            pf, pq = clf.probabilities(fp32.logits(x)), clf.probabilities(q.logits(x))
            af, aq = M.roc_auc(y, pf), M.roc_auc(y, pq)
            acc_f = M.binary_metrics(y, pf, clf.threshold)["accuracy"]
            acc_q = M.binary_metrics(y, pq, clf.threshold)["accuracy"]
            d = np.abs(pf - pq)
            print(
                f"| {name} | {af:.5f} | {aq:.5f} | {aq - af:+.5f} | {acc_f:.4f} | {acc_q:.4f} | {d.mean():.4f} | "
                f"{d.max():.4f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="bundle (default: the bundled model)")
    args = parser.parse_args()
    clf = Classifier.load(args.model)
    root = shared_data_root()
    draft_table(clf, list_images(root / "fullres_sample"))
    int8_table(clf, root / "chest_xray_224")


if __name__ == "__main__":
    main()
