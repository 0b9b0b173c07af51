"""Prediction speed of given bundles on validation JPEGs: in-process and whole-process `pneumoscan predict`.

    python benchmarks/predict_bundle.py --model src/pneumoscan/default_model --model RUN/model [--images 200]

The images are the first ``--images`` of the first bundle's own validation split (patients held out of
train; never the test split). In-process: ``Classifier.predict`` on the ONNX engine after one warm-up
call (decoding included). Whole-process: ``pneumoscan predict --model B FILES --format jsonl`` in a fresh
process (imports, bundle checks, session start included), its peak RSS from harness.py. Medians of the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from harness import run_child

from pneumoscan.inference.classifier import Classifier
from pneumoscan.model.store import load_bundle


def in_process(model: Path, files: list[str]) -> float:
    clf = Classifier(load_bundle(model), engine="onnx")
    clf.predict(files[:8])  # warm-up: session and thread pools
    start = time.perf_counter()
    results = clf.predict(files)
    took = time.perf_counter() - start
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, action="append", required=True, help="a bundle (repeatable)")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    validation = load_bundle(args.model[0]).training_splits()[1]
    files = [str(s.path) for s in validation[: args.images]]
    rows = []
    for model in args.model:
        bundle = load_bundle(model)
        size = sum(f.stat().st_size for f in bundle.path.iterdir() if f.is_file()) / 2**20
        inside = [in_process(model, files) for _ in range(args.rounds)]
        cli = ["predict", "--model", model, *files, "--engine", "onnx", "--format", "jsonl", "--quiet"]
        whole = [run_child("pneumoscan.cli", cli) for _ in range(args.rounds)]
        rows.append(
            f"| {bundle.config['backbone']} ({model.name}) | {size:.0f} "
            f"| {len(files) / statistics.median(inside):.1f} "
            f"| {len(files) / statistics.median(w[0] for w in whole):.1f} "
            f"| {statistics.median(w[1] for w in whole):.0f} |"
        )
    print(f"{len(files)} validation JPEGs (224 px), ONNX engine, medians of {args.rounds} rounds\n")
    print("| model | bundle MB | in-process images/s | whole-process images/s | peak RSS MB |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
