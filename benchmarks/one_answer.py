"""One image, one answer: how far the probability moves when the same film arrives in another form.

    python benchmarks/one_answer.py [--model NAME_OR_BUNDLE ...] [--films 26]

The films: the official val films at full resolution, then the full-resolution samples (never used to fit
anything). Each film is compared with itself given as a uint8 array, in forms that keep its pixels (the
JPEG as it is, its decoded pixels as 8- and 16-bit PNG, 12-bit DICOM plain, rescaled, windowed over its
range and MONOCHROME1), also at a quarter of the size, and in forms that change them a little (JPEG at
quality 90 and 100, a 12-bit DICOM that stores each 8-bit value times 16 and so reads 0.4% darker).
Cells: the largest and the median absolute change of probability over the films, gate off.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import corpus  # noqa: E402
import ood  # noqa: E402

from pneumoscan import Classifier  # noqa: E402
from pneumoscan.io.dataset import shared_data_root  # noqa: E402


def shifted_dicom(grey: np.ndarray) -> bytes:
    """A 12-bit DICOM of ``grey`` stored as value x 16 (0-4080), as a bit-shifting export writes it."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(corpus.dicom(grey)))
    ds.PixelData = (grey.astype(np.uint16) * 16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def forms(film: Path) -> dict[str, bytes]:
    data = film.read_bytes()
    grey = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    small = grey[::4, ::4].copy()
    out = {"JPEG as it is (full size)": data}
    for label, g in (("full size", grey), ("quarter size", small)):
        out |= {
            f"PNG 8-bit ({label})": ood.enc(g),
            f"PNG 16-bit ({label})": corpus.png16(g),
            f"DICOM 12-bit, plain ({label})": corpus.dicom(g),
            f"DICOM 12-bit, rescaled ({label})": corpus.dicom(g, rescale=(2.0, -1024.0)),
            f"DICOM 12-bit, windowed ({label})": corpus.dicom(g, window=(2048, 4096)),
            f"DICOM 12-bit, MONOCHROME1 ({label})": corpus.dicom(g, "MONOCHROME1"),
        }
    out |= {
        "changed: JPEG quality 90 (quarter size)": ood.enc(small, "JPEG"),
        "changed: JPEG quality 100, no subsampling (quarter size)": corpus.encode(
            Image.fromarray(small), "JPEG", quality=100, subsampling=0
        ),
        "changed: DICOM value x 16, 0.4% darker (quarter size)": shifted_dicom(small),
    }
    return out


def reference(film: Path, form: str) -> np.ndarray:
    grey = np.asarray(Image.open(film).convert("L"))
    return grey if "full size" in form else grey[::4, ::4].copy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], help="bundled name or bundle (default: fast, default)")
    parser.add_argument("--films", type=int, default=26, help="films to use (default 26)")
    args = parser.parse_args()
    root = shared_data_root()
    films = sorted((root / "val_fullres").rglob("*.jpeg")) + sorted((root / "fullres_sample").rglob("*.jpeg"))
    films = films[: args.films]
    models = args.model or ["fast", "default"]
    changes: dict[str, dict[str, list[float]]] = {m: {} for m in models}
    for name in models:
        clf = Classifier.load(name)
        for film in films:
            made = forms(film)
            arrays = {"full size": reference(film, "full size"), "quarter size": reference(film, "quarter size")}
            base = dict(zip(arrays, (r.probability for r in clf.predict(list(arrays.values()), gate=False))))
            for form, result in zip(made, clf.predict([io.BytesIO(d) for d in made.values()], gate=False)):
                ref = base["full size" if "full size" in form else "quarter size"]
                changes[name].setdefault(form, []).append(abs(result.probability - ref))
    print(f"Change of probability from the film given as a uint8 array, {len(films)} films; largest (median)\n")
    print("| form | " + " | ".join(models) + " |")
    print("|---|" + "---|" * len(models))
    for form in changes[models[0]]:
        cells = [f"{max(changes[m][form]):.4f} ({statistics.median(changes[m][form]):.4f})" for m in models]
        print(f"| {form} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
