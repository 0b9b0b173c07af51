"""Compute (or find in the cache) frozen features of the official train and val splits; print speed.

    python benchmarks/frozen_features.py --backbone dinov2_vits14 [--split test]

The test split is only ever passed at read time (after the ranking rule chose a candidate).
"""

import argparse
import time

from pneumoscan.io.dataset import load_split, shared_data_root
from pneumoscan.training.features import frozen_features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="dinov2_vits14")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--split", action="append", help="official splits (default: train, val)")
    args = parser.parse_args()
    root = shared_data_root() / "chest_xray_224"
    print("| backbone | split | images | seconds | images/s |\n|---|---|---|---|---|")
    for split in args.split or ["train", "val"]:
        samples = load_split(root, split)
        start = time.perf_counter()
        features, kept, errors = frozen_features(args.backbone, samples, args.image_size)
        took = time.perf_counter() - start
        print(f"| {args.backbone} | {split} | {len(kept)} | {took:.1f} | {len(kept) / took:.1f} |", flush=True)


if __name__ == "__main__":
    main()
