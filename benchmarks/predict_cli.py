"""`pneumoscan predict` over the official test split as a user runs it: whole-process peak memory and images/s.

    python benchmarks/predict_cli.py [--baseline-src OLD_CHECKOUT/src] [--rounds 3] [--model BUNDLE_OR_NAME ...]

Each round runs the command in a fresh process (the default engine, JSON lines to /dev/null) and reads
its peak RSS (VmHWM, see harness.py). With --baseline-src the same command runs
from another source tree in the same rounds, interleaved, for the ratio. Medians of the rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from harness import run_child

from pneumoscan.data import list_images, shared_data_root


def run_once(src: Path | None, folder: Path, model: str | None = None) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one `pneumoscan predict FOLDER` in a fresh process."""
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    extra = ["--model", model] if model else []
    return run_child("pneumoscan.cli", ["predict", folder, "--format", "jsonl", "--quiet", *extra], env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-src", type=Path, default=None, help="src folder of the baseline checkout")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--model", action="append", default=[], help="another model to time (repeatable)")
    args = parser.parse_args()
    folder = shared_data_root().resolve() / "chest_xray_224" / "test"
    n = len(list_images(folder))
    runs = {"baseline": [], "current": []} if args.baseline_src else {"current": []}
    runs.update({f"current, --model {m}": [] for m in args.model})
    models = {"current": None, "baseline": None, **{f"current, --model {m}": m for m in args.model}}

    def one(name: str):
        return run_once(args.baseline_src if name == "baseline" else None, folder, models[name])

    for name in runs:
        one(name)  # warm the ONNX cache and the page cache; not counted
    for _ in range(args.rounds):
        for name in runs:
            runs[name].append(one(name))
    print(f"`pneumoscan predict` over {n} test images (224 px JPEG), default engine, medians of {args.rounds} rounds\n")
    print("| code | wall s | images/s | peak RSS MB | ratio images/s | ratio RSS |")
    print("|---|---|---|---|---|---|")
    ref = None
    for name, rows in runs.items():
        seconds = statistics.median(r[0] for r in rows)
        rss = statistics.median(r[1] for r in rows)
        ref = ref or (n / seconds, rss)
        speed = n / seconds
        print(f"| {name} | {seconds:.2f} | {speed:.0f} | {rss:.0f} | {speed / ref[0]:.2f}x | {rss / ref[1]:.2f}x |")


if __name__ == "__main__":
    main()
