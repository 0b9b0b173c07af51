"""`pneumoscan predict --output` over many inputs: memory stays flat, results stream to the file.

    python benchmarks/predict_stream.py [--counts 10000 100000]

For each count, a folder of that many symbolic links to the 624 official test images (cycled) is
predicted in a fresh process with `--output results.jsonl`; the table gives images/s, the process's peak
RSS (VmHWM, see harness.py) and the ratio to the smallest count, and checks that every input has
exactly one line.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from harness import run_child

from pneumoscan.io.dataset import list_images, shared_data_root


def run(count: int, sources: list[Path], workdir: Path) -> tuple[float, float]:
    folder = workdir / f"links{count}"
    folder.mkdir()
    for i in range(count):
        os.symlink(sources[i % len(sources)], folder / f"{i:07d}.jpeg")
    out = workdir / f"results{count}.jsonl"
    seconds, rss = run_child("pneumoscan.cli", ["predict", folder, "--output", out, "--quiet"])
    lines = out.read_bytes().count(b"\n")
    assert lines == count, f"{lines} lines for {count} inputs"
    return count / seconds, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[10_000, 100_000])
    args = parser.parse_args()
    sources = list_images(shared_data_root().resolve() / "chest_xray_224" / "test")
    print("| inputs | images/s | peak RSS MB | ratio images/s | ratio RSS |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        base = None
        for count in sorted(args.counts):
            speed, rss = run(count, sources, Path(tmp))
            base = base or (speed, rss)
            ratios = f"{speed / base[0]:.2f}x | {rss / base[1]:.2f}x"
            print(f"| {count:,} | {speed:.0f} | {rss:.0f} | {ratios} |", flush=True)


if __name__ == "__main__":
    main()
