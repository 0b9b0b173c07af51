"""Give an existing bundle the input gate and the bacterial/viral head, exactly as training fits them.

    python benchmarks/add_heads.py [--model BUNDLE] [--data ../shared/data/chest_xray_224]

For bundles trained before the gate and the subtype head existed. The images are the bundle's own
training images and validation patients (carved from train by patient with its recipe's seed and
fraction); the test split is not opened. The fitting is training's (``training.fit_gate`` and
``training.fit_subtype`` on the PyTorch network), so a bundle gets the same heads either way; where the
bundle has an int8 ONNX model, the gate's feature limit for it is fitted on its own features of the same
validation X-rays. The weights and the pneumonia head are untouched.
"""

from __future__ import annotations

import argparse

import numpy as np

from pneumoscan.bundle import GATE, SUBTYPE, WEIGHTS, load_bundle, write_bundle
from pneumoscan.data import load_images
from pneumoscan.inference import OnnxEngine
from pneumoscan.training import fit_gate, fit_subtype, gate_images


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
    if (int8 := bundle.onnx_path(int8=True)) is not None:
        engine = OnnxEngine(int8, bundle)
        calibration = gate_images(train_images, val_images, bundle.config["training"]["recipe"]["seed"])[1]
        features = np.concatenate([engine.run(calibration[i : i + 64])[1] for i in range(0, len(calibration), 64)])
        gate.fit_int8_limit(features)
        print(f"gate: int8 feature limit {gate.int8_limit:.2f} (fp32 {gate.feature_limit:.2f})")
    files = {GATE: gate.to_bytes()}
    metrics = bundle.metrics
    print(
        f"gate: {len(gate.features.scale)} feature components, limits: features {gate.feature_limit:.2f}, "
        f"statistics {gate.statistics_limit:.2f}, orientation {gate.orientation_limit:.2f}"
    )
    if fitted := fit_subtype(net, train_images, train, val_images, val):
        head, report = fitted
        files[SUBTYPE] = head.to_bytes()
        metrics = {**metrics, "validation": {**metrics["validation"], "subtype": report}}
        print(f"subtype head: validation AUC {report['auc']:.3f}, temperature {head.temperature:.3f}")
    write_bundle(bundle.path, bundle.config, metrics, weights=bundle.path / WEIGHTS, files=files)
    print(f"written to {bundle.path}")


if __name__ == "__main__":
    main()
