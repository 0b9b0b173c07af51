"""How closely the shipped int8 graph's features follow the float32 network's (both from the cache).

    PYTHONPATH=src python experiments/int8_agreement.py [--backbone dinov2_vits14] [--split train]

Per image: the correlation of its two feature vectors. Per feature: the correlation over the images of
its two versions (what a linear head reads).
"""

from __future__ import annotations

import argparse

import numpy as np

from pneumoscan.io.dataset import load_split, shared_data_root
from pneumoscan.model.frozen_graphs import INT8, backbone_graph
from pneumoscan.training.features import frozen_features


def rowwise_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="dinov2_vits14")
    parser.add_argument("--split", default="train")
    args = parser.parse_args()
    samples = load_split(shared_data_root().resolve() / "chest_xray_224", args.split)
    fp32, kept, _ = frozen_features(args.backbone, samples, progress=False)
    int8, kept8, _ = frozen_features(
        args.backbone, kept, graph=backbone_graph(args.backbone, 224, INT8), progress=False
    )
    assert [s.path for s in kept8] == [s.path for s in kept]
    per_image = rowwise_correlation(fp32, int8)
    per_feature = rowwise_correlation(fp32.T, int8.T)
    q = lambda x: " / ".join(f"{v:.4f}" for v in np.quantile(x, [0, 0.01, 0.5]))  # noqa: E731
    print(f"{len(kept)} {args.split} images, {fp32.shape[1]} features")
    print("| correlation of int8 with fp32 | min / 1st percentile / median |\n|---|---|")
    print(f"| per image | {q(per_image)} |\n| per feature | {q(per_feature)} |")


if __name__ == "__main__":
    main()
