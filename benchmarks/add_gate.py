"""Fit an input gate for an existing bundle, as training now does, and write it into the bundle.

    python benchmarks/add_gate.py [--model BUNDLE] [--data ../shared/data/chest_xray_224]

Training images and validation patients are those of the bundle's recipe (validation carved from train by
patient with its seed and fraction); the test split is not opened. Used once for the bundled model, which
was trained before the gate existed.
"""

from __future__ import annotations

import argparse

from pneumoscan.bundle import GATE, WEIGHTS, load_bundle, write_bundle
from pneumoscan.data import load_images, stratified_subset
from pneumoscan.training import GATE_TRAIN_IMAGES, fit_gate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="bundle folder (default: the bundled model)")
    parser.add_argument("--data", default="../shared/data/chest_xray_224", help="the bundle's training data root")
    args = parser.parse_args()
    bundle = load_bundle(args.model)
    seed = bundle.config["training"]["recipe"]["seed"]
    train, val = bundle.training_splits(args.data)
    train_images = load_images(stratified_subset(train, GATE_TRAIN_IMAGES // 2, seed), bundle.image_size)[0]
    val_images = load_images(val, bundle.image_size)[0]
    gate = fit_gate(bundle.load_net(), train_images, val_images, seed)
    write_bundle(
        bundle.path, bundle.config, bundle.metrics, weights=bundle.path / WEIGHTS, files={GATE: gate.to_bytes()}
    )
    print(f"gate written to {bundle.path / GATE}: {len(gate.scale)} components, limit {gate.limit:.2f}")


if __name__ == "__main__":
    main()
