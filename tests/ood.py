"""Inputs that are not paediatric chest X-rays, made by code (nothing binary is committed): the
out-of-distribution sets of the input gate's tests and of benchmarks/gate_ood.py.

Each set maps a name to encoded bytes (PNG, or DICOM for CT and MR), as a user would upload them."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw


def _png(image) -> bytes:
    image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def photographs() -> dict[str, bytes]:
    """scikit-image's bundled sample photographs (no download)."""
    import skimage.data as d

    names = ("astronaut", "camera", "chelsea", "coffee", "rocket", "coins", "moon", "clock", "brick", "grass")
    return {name: _png(np.asarray(getattr(d, name)(), dtype=np.uint8)) for name in names}


def ct_and_mr() -> dict[str, bytes]:
    """CT and MR slices from the DICOM samples that ship with pydicom."""
    from pathlib import Path

    import pydicom

    folder = Path(pydicom.__file__).parent / "data" / "test_files"  # read in place: nothing is fetched
    names = ("CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm")
    return {name: (folder / name).read_bytes() for name in names}


_WORDS = (
    "patient history findings impression chest radiograph lungs clear no acute process heart size normal "
    "the quick brown fox jumps over the lazy dog report signed discharge summary medication dose"
).split()


def documents() -> dict[str, bytes]:
    """Rendered pages of text, and scikit-image's scanned page and text."""
    import skimage.data as d

    out = {"page": _png(d.page()), "text": _png(d.text())}
    rng = np.random.default_rng(0)
    for n, size in enumerate(((800, 1000), (1000, 700), (600, 600))):
        page = Image.new("L", size, 255)
        draw = ImageDraw.Draw(page)
        for row in range(20, size[1] - 20, 18):
            draw.text((30, row), " ".join(rng.choice(_WORDS, 9)), fill=0)
        out[f"text page {n}"] = _png(page)
    return out


def screenshots() -> dict[str, bytes]:
    """Windows with title bars, buttons, text and an image panel, as a screen capture looks."""
    out = {}
    rng = np.random.default_rng(1)
    for n in range(3):
        screen = Image.new("RGB", (1280, 800), (240, 242, 245))
        draw = ImageDraw.Draw(screen)
        draw.rectangle((0, 0, 1280, 40), fill=(40, 60, 90))
        draw.text((20, 12), "pneumoscan - Chromium", fill=(255, 255, 255))
        for b in range(5):
            x = 40 + 160 * b
            draw.rectangle((x, 70, x + 140, 110), fill=tuple(int(v) for v in rng.integers(60, 200, 3)), outline=0)
            draw.text((x + 20, 82), f"Button {b}", fill=0)
        for row in range(140, 760, 22):
            draw.text((40, row), " ".join(rng.choice(_WORDS, 7)), fill=(30, 30, 30))
        draw.rectangle((700, 140, 1240, 760), fill=(20, 20, 20))
        out[f"screenshot {n}"] = _png(screen)
    return out


def plots() -> dict[str, bytes]:
    """Figures like the ones pneumoscan itself draws: a ROC curve, bars, a scatter, a histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(2)
    out = {}
    drawings: dict[str, Callable] = {
        "roc": lambda ax: ax.plot(np.linspace(0, 1, 50), np.linspace(0, 1, 50) ** 0.3),
        "bars": lambda ax: ax.bar(range(8), rng.random(8)),
        "scatter": lambda ax: ax.scatter(rng.random(200), rng.random(200)),
        "histogram": lambda ax: ax.hist(rng.normal(size=500), bins=30),
    }
    for name, draw in drawings.items():
        fig, ax = plt.subplots(figsize=(5, 4))
        draw(ax)
        ax.set_title(name)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
        plt.close(fig)
        out[name] = buf.getvalue()
    return out


def noise_and_blank() -> dict[str, bytes]:
    rng = np.random.default_rng(3)
    out = {f"uniform noise {i}": _png(rng.integers(0, 256, (512, 512), dtype=np.uint8)) for i in range(3)}
    out.update({f"gaussian noise {i}": _png(np.clip(rng.normal(128, 40, (512, 512)), 0, 255).astype(np.uint8))
                for i in range(3)})  # fmt: skip
    out.update({f"blank {v}": _png(np.full((512, 512), v, np.uint8)) for v in (0, 128, 255)})
    return out


def transformed_xrays(xray: np.ndarray) -> dict[str, bytes]:
    """One real chest X-ray (uint8 grey) inverted, rotated by 90 and 180 degrees, and cropped to a corner."""
    h, w = xray.shape
    return {
        "inverted polarity": _png(255 - xray),
        "rotated 90": _png(np.rot90(xray).copy()),
        "rotated 180": _png(np.rot90(xray, 2).copy()),
        "corner crop": _png(xray[: h // 3, : w // 3].copy()),
    }


MUST_REFUSE = {
    "photographs": photographs,
    "CT and MR": ct_and_mr,
    "documents": documents,
    "noise and blank": noise_and_blank,
}
REPORTED = {"screenshots": screenshots, "plots": plots}
