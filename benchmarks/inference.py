"""End-to-end inference speed and memory: image files on disk to probabilities.

    python benchmarks/inference.py [--model BUNDLE] [--repeats 3]

Engines: torch eager, ONNX Runtime fp32, ONNX Runtime int8, all measured in this process,
interleaved, so their ratios to torch eager are fair on a noisy shared machine (medians of
``--repeats`` rounds). Peak RSS is measured per engine in a fresh process running
``pneumoscan predict`` on the test images with that engine (harness.run_child), since a process's
peak only grows. Data: the 624 official test images (224 px) and the 48 full-resolution samples,
from ``$PNEUMOSCAN_DATA`` (default ../shared/data).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

import numpy as np
from harness import run_child, self_peak_rss_mb, table, timed

from pneumoscan import Classifier
from pneumoscan.io.dataset import list_images, shared_data_root
from pneumoscan.model.store import load_bundle

ENGINES = (("torch", "torch", False), ("onnx fp32", "onnx", False), ("onnx int8", "onnx", True))


def prepared_bundle(model: str | None, workdir: Path) -> Path:
    """A copy of the bundle with model.onnx and model.int8.onnx (exported here when missing)."""
    from pneumoscan.model.onnx_export import export_onnx, quantize_int8
    from pneumoscan.training.export import training_images

    source = load_bundle(model)
    path = Path(shutil.copytree(source.path, workdir / "model"))
    bundle = load_bundle(path)
    fp32 = bundle.onnx_path() or export_onnx(bundle)
    if bundle.onnx_path(int8=True) is None:
        quantize_int8(bundle, fp32, training_images(bundle, shared_data_root() / "chest_xray_224", 256))
    return path


def throughput(clf: Classifier, files: list[Path], batch_size: int = 32) -> float:
    results: list = []
    seconds = timed(lambda: results.extend(clf.predict(files, batch_size=batch_size)))
    assert all(r.ok for r in results)
    return len(files) / seconds


def latencies_ms(clf: Classifier, files: list[Path]) -> list[float]:
    return [1000 * timed(lambda f=f: clf.predict_one(f)) for f in files]


def peak_rss_child(bundle: Path, engine: str, int8: bool, files: list[Path]) -> float:
    """Peak RSS (MB) of a fresh process that loads one engine and predicts ``files`` in batches of 32."""
    args = ["predict", "--model", bundle, "--engine", engine, "--batch-size", "32", "--quiet", "--format", "csv"]
    precision = ["--int8"] if int8 else ["--fp32"] if engine == "onnx" else []
    return run_child("pneumoscan.cli", [*args, *precision, *files])[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="bundle to measure (default: the bundled model)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported (3)")
    parser.add_argument("--latency-images", type=int, default=100, help="files timed one at a time (100)")
    args = parser.parse_args()

    data = shared_data_root()
    test_files = list_images(data / "chest_xray_224" / "test")
    fullres = list_images(data / "fullres_sample")
    with tempfile.TemporaryDirectory() as tmp:
        bundle = prepared_bundle(args.model, Path(tmp))
        classifiers = {
            name: Classifier.load(bundle, engine=engine, int8=int8, fp32=engine == "onnx" and not int8)
            for name, engine, int8 in ENGINES
        }
        for clf in classifiers.values():  # warm up: first runs allocate and pick kernels
            clf.predict(test_files[:32])
            clf.predict_one(test_files[0])
        rounds = {name: {"batch": [], "fullres": [], "latency": []} for name in classifiers}
        for _ in range(args.repeats):
            for name, clf in classifiers.items():
                rounds[name]["batch"].append(throughput(clf, test_files))
                rounds[name]["fullres"].append(throughput(clf, fullres))
                rounds[name]["latency"] += latencies_ms(clf, test_files[: args.latency_images])
        rss = {name: peak_rss_child(bundle, engine, int8, test_files) for name, engine, int8 in ENGINES}

    base = statistics.median(rounds["torch"]["batch"])
    print(
        f"End-to-end inference, files to probabilities ({len(test_files)} test images at 224 px; "
        f"{len(fullres)} full-resolution files); medians of {args.repeats} interleaved rounds"
    )
    header = ["engine", "224 px images/s (batch 32)", "ratio to torch", "full-res images/s", "batch-1 p50 ms"]
    header += ["batch-1 p95 ms", "peak RSS MB"]
    rows = []
    for name in classifiers:
        r = rounds[name]
        batch = statistics.median(r["batch"])
        p50, p95 = np.percentile(r["latency"], [50, 95])
        full = statistics.median(r["fullres"])
        rows.append([name, f"{batch:.0f}", f"{batch / base:.2f}x", f"{full:.0f}", f"{p50:.1f}", f"{p95:.1f}"])
        rows[-1].append(f"{rss[name]:.0f}")
    print(table(header, rows))
    print(f"(this process: peak RSS {self_peak_rss_mb():.0f} MB, all three engines loaded)")


if __name__ == "__main__":
    main()
