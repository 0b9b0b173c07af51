"""`pneumoscan predict --ray local` against one process, over the 624 official test images.

    python benchmarks/predict_ray.py [--rounds 3]

Both run the whole command in a fresh process with `--output` (the same rows); the Ray run includes
starting a local cluster and its actors, which is what a user pays on one machine. Medians of the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pneumoscan.data import list_images, shared_data_root


def run(extra: list[str], folder: Path, out: Path) -> float:
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pneumoscan.cli", "predict", str(folder), "--output", str(out), "--quiet", *extra]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    folder = shared_data_root().resolve() / "chest_xray_224" / "test"
    n = len(list_images(folder))
    times: dict[str, list[float]] = {"one process": [], "Ray, local cluster (2 actors)": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            times["one process"].append(run([], folder, Path(tmp) / "a.jsonl"))
            times["Ray, local cluster (2 actors)"].append(run(["--ray", "local"], folder, Path(tmp) / "b.jsonl"))
    base = statistics.median(times["one process"])
    print(f"`pneumoscan predict` over {n} test images, whole command, medians of {args.rounds}\n")
    print("| run | wall s | images/s | ratio |")
    print("|---|---|---|---|")
    for name, values in times.items():
        t = statistics.median(values)
        print(f"| {name} | {t:.1f} | {n / t:.0f} | {base / t:.2f}x |")


if __name__ == "__main__":
    main()
