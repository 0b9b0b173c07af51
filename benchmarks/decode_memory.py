"""Peak memory of decoding large JPEGs, against the loader's estimate (the decode bound's accounting).

    python benchmarks/decode_memory.py [--side 6000]

For each picture (a real X-ray scaled up, grey or colour, baseline or progressive), a fresh process loads
it with ``load_image(draft_size=224)`` (as predict does) and reports how much its peak RSS grew; the
estimate is the output at draft scale plus libjpeg's coefficient buffer (progressive and multi-scan files).
Pictures whose estimate is over the 256 MB bound are refused before decoding (their growth is then ~0).
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from pneumoscan.io.dataset import shared_data_root
from pneumoscan.io.images import DRAFT_OVERSAMPLE, _peak_bytes_per_pixel, jpeg_header

# The child resets its peak RSS (/proc/self/clear_refs) first: a forked process starts with its parent's.
CHILD = """
import sys
from pneumoscan.io.images import load_image

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])

data = open(sys.argv[1], "rb").read()
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS:")
try:
    load_image(data, draft_size=224)
    outcome = "loaded"
except Exception as exc:
    outcome = type(exc).__name__ + ": " + str(exc)[:80]
print(status("VmHWM:") - before, outcome)
"""


def picture(side: int, colour: bool) -> Image.Image:
    """A real X-ray scaled up, with film grain (noise): smooth pictures leave most of libjpeg's coefficient
    pages untouched, grain touches them all (the worst case, which the bound must cover)."""
    source = sorted((shared_data_root() / "chest_xray_224" / "test" / "PNEUMONIA").iterdir())[0]
    grey = np.asarray(Image.open(source).convert("L").resize((side, side), Image.Resampling.BILINEAR), np.float32)
    grey = grey + np.random.default_rng(0).normal(0, 12, grey.shape).astype(np.float32)
    if colour:
        grey = grey[..., None] * np.array([1.0, 0.9, 0.8], np.float32)
    return Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8))


def estimate(data: bytes) -> float:
    header = jpeg_header(data)
    scale = 1
    for s in (8, 4, 2, 1):
        if min(header.width, header.height) // s >= DRAFT_OVERSAMPLE * 224:
            scale = s
            break
    output = -(-header.width // scale) * -(-header.height // scale) * _peak_bytes_per_pixel("L")
    return (output + header.working) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=6000, help="picture side in pixels (default 6000)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for colour in (False, True):
            image = picture(args.side, colour)
            for progressive in (False, True):
                buf = io.BytesIO()
                image.save(buf, "JPEG", quality=90, progressive=progressive)
                path = Path(tmp) / "x.jpeg"
                path.write_bytes(buf.getvalue())
                done = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True)
                grown, outcome = done.stdout.strip().split(" ", 1)
                kind = ("colour" if colour else "grey") + (" progressive" if progressive else " baseline")
                rows.append((kind, len(buf.getvalue()) / 2**20, int(grown) / 1024, estimate(buf.getvalue()), outcome))
    print(f"{args.side}x{args.side} JPEG, load_image(draft_size=224)")
    print(f"{'picture':<22} {'file MB':>8} {'peak RSS growth MB':>19} {'estimate MB':>12}  outcome")
    for kind, size, grown, guess, outcome in rows:
        print(f"{kind:<22} {size:>8.1f} {grown:>19.0f} {guess:>12.0f}  {outcome}")
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
