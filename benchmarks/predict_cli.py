"""`pneumoscan predict` over the official test split as a user runs it: whole-process peak memory and images/s.

    python benchmarks/predict_cli.py [--baseline-src OLD_CHECKOUT/src] [--rounds 3] [--model BUNDLE_OR_NAME ...]
                                     [--gate-cost]

Each round runs the command in a fresh process (the default engine, JSON lines to /dev/null) and reads
its peak RSS (VmHWM, see harness.py). With --baseline-src the same command runs
from another source tree in the same rounds, interleaved, for the ratio. With --gate-cost every model
also runs with --no-gate (input gate and quality checks off) in the same rounds: the gate's share of the
whole process. Medians of the rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from harness import run_child

from pneumoscan.io.dataset import list_images, shared_data_root


def run_once(src: Path | None, folder: Path, extra: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one `pneumoscan predict FOLDER [EXTRA]` in a fresh process."""
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    return run_child("pneumoscan.cli", ["predict", folder, "--format", "jsonl", "--quiet", *extra], env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-src", type=Path, default=None, help="src folder of the baseline checkout")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--model", action="append", default=[], help="another model to time (repeatable)")
    parser.add_argument("--gate-cost", action="store_true", help="also time every model with --no-gate")
    args = parser.parse_args()
    folder = shared_data_root().resolve() / "chest_xray_224" / "test"
    n = len(list_images(folder))
    runs: dict[str, tuple[Path | None, list[str]]] = {"current": (None, [])}
    if args.baseline_src:
        runs["baseline"] = (args.baseline_src, [])
    runs |= {f"current, --model {m}": (None, ["--model", m]) for m in args.model}
    if args.gate_cost:
        runs |= {f"{name}, --no-gate": (src, [*extra, "--no-gate"]) for name, (src, extra) in runs.items()}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for src, extra in runs.values():
        run_once(src, folder, extra)  # warm the ONNX cache and the page cache; not counted
    for _ in range(args.rounds):
        for name, (src, extra) in runs.items():
            times[name].append(run_once(src, folder, extra))
    print(f"`pneumoscan predict` over {n} test images (224 px JPEG), default engine, medians of {args.rounds} rounds\n")
    print("| code | wall s | images/s | peak RSS MB | ratio images/s | ratio RSS |")
    print("|---|---|---|---|---|---|")
    ref = None
    for name, rows in times.items():
        seconds = statistics.median(r[0] for r in rows)
        rss = statistics.median(r[1] for r in rows)
        ref = ref or (n / seconds, rss)
        speed = n / seconds
        print(f"| {name} | {seconds:.2f} | {speed:.0f} | {rss:.0f} | {speed / ref[0]:.2f}x | {rss / ref[1]:.2f}x |")


if __name__ == "__main__":
    main()
