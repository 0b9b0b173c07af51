"""Give an existing bundle the input gate and the bacterial/viral head, exactly as training fits them.

    python benchmarks/add_heads.py [--model BUNDLE] [--data ../shared/data/chest_xray_224]

For bundles trained before the gate and the subtype head existed. The images are the bundle's own
training images and validation patients (carved from train by patient with its recipe's seed and
fraction); the test split is not opened. The fitting is training's (``training.fit_gate`` and
``training.fit_subtype`` on the PyTorch network), so a bundle gets the same heads either way. The
weights and the pneumonia head are untouched.
"""

from __future__ import annotations

import argparse

from pneumoscan.bundle import GATE, SUBTYPE, WEIGHTS, load_bundle, write_bundle
from pneumoscan.data import load_images
from pneumoscan.training import fit_gate, fit_subtype


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="bundle folder (default: the bundled model)")
    parser.add_argument("--data", default="../shared/data/chest_xray_224", help="the bundle's training data root")
    args = parser.parse_args()
    bundle = load_bundle(args.model)
    net = bundle.load_net()
    train, val = bundle.training_splits(args.data)
    train_images, train, _ = load_images(train, bundle.image_size)
    val_images, val, _ = load_images(val, bundle.image_size)
    gate = fit_gate(net, train_images, val_images, bundle.config["training"]["recipe"]["seed"])
    files = {GATE: gate.to_bytes()}
    metrics = bundle.metrics
    print(f"gate: {len(gate.scale)} components, limit {gate.limit:.2f}")
    if fitted := fit_subtype(net, train_images, train, val_images, val):
        head, report = fitted
        files[SUBTYPE] = head.to_bytes()
        metrics = {**metrics, "validation": {**metrics["validation"], "subtype": report}}
        print(f"subtype head: validation AUC {report['auc']:.3f}, temperature {head.temperature:.3f}")
    write_bundle(bundle.path, bundle.config, metrics, weights=bundle.path / WEIGHTS, files=files)
    print(f"written to {bundle.path}")


if __name__ == "__main__":
    main()
