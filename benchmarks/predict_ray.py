"""`pneumoscan predict --ray local` against one process, over the 624 official test images.

    python benchmarks/predict_ray.py [--rounds 3]

Both run the whole command in a fresh process with `--output` (the same rows); the Ray run includes
starting a local cluster and its actors, which is what a user pays on one machine. Medians of the rounds.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from harness import interleaved, medians, run_child, table

from pneumoscan.io.dataset import list_images, shared_data_root


def run(extra: list[str], folder: Path, out: Path) -> float:
    """Wall seconds of one whole `pneumoscan predict` writing ``out``."""
    out.unlink(missing_ok=True)
    return run_child("pneumoscan.cli", ["predict", folder, "--output", out, "--quiet", *extra])[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    folder = shared_data_root().resolve() / "chest_xray_224" / "test"
    n = len(list_images(folder))
    with tempfile.TemporaryDirectory() as tmp:
        cases = {
            "one process": lambda: run([], folder, Path(tmp) / "a.jsonl"),
            "Ray, local cluster (2 actors)": lambda: run(["--ray", "local"], folder, Path(tmp) / "b.jsonl"),
        }
        times = medians(interleaved(cases, args.rounds))
    base = times["one process"]
    print(f"`pneumoscan predict` over {n} test images, whole command, medians of {args.rounds}\n")
    rows = [(name, f"{t:.1f}", f"{n / t:.0f}", f"{base / t:.2f}x") for name, t in times.items()]
    print(table(("run", "wall s", "images/s", "ratio"), rows))


if __name__ == "__main__":
    main()
