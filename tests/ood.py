"""Inputs that are not paediatric chest X-rays, made by code (nothing binary is committed): the
out-of-distribution sets of the input gate's tests and of benchmarks/gate_ood.py.

Each set maps a name to encoded bytes (PNG or JPEG, or DICOM for CT and MR), as a user would upload them.
The generated kinds (:data:`GENERATED`, :data:`FROM_FILMS`, :data:`DEGRADED`) draw sizes, positions,
levels and shapes from a seed: :func:`generate` makes ``n`` of a kind, and another seed makes others."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont


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


# Generated kinds: each function takes a numpy Generator (and real films, uint8 grey) and returns one image.


def enc(image, fmt: str = "PNG") -> bytes:
    """An array or PIL image as PNG or JPEG (quality 90) bytes."""
    image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _size(rng, lo: int = 300, hi: int = 1600) -> tuple[int, int]:
    return int(rng.integers(lo, hi)), int(rng.integers(lo, hi))


def _colour(rng, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(lo, hi, 3))


def flat(rng):
    w, h = _size(rng)
    field = np.full((h, w), rng.integers(0, 256), np.float32) + rng.normal(0, rng.choice([0, 1, 3]), (h, w))
    return np.clip(field, 0, 255).astype(np.uint8)


def gradient(rng):
    """A linear ramp in a random direction, grey or between two colours."""
    w, h = _size(rng)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    t = np.cos(rng.uniform(0, 2 * np.pi)) * xx + np.sin(rng.uniform(0, 2 * np.pi)) * yy
    t = (t - t.min()) / (np.ptp(t) + 1e-9)
    if rng.random() < 0.5:
        lo, hi = np.sort(rng.uniform(0, 255, 2))
        return (lo + (hi - lo) * t).astype(np.uint8)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    return (c0 + (c1 - c0) * t[..., None]).astype(np.uint8)


def vignette(rng):
    """A radial falloff around a random centre, bright or dark in the middle."""
    w, h = _size(rng)
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = h * rng.uniform(0.3, 0.7), w * rng.uniform(0.3, 0.7)
    v = np.clip(1 - (np.hypot((yy - cy) / h, (xx - cx) / w) / 0.7) ** rng.uniform(1, 3), 0, 1)
    v = 1 - v if rng.random() < 0.5 else v
    lo, hi = np.sort(rng.uniform(0, 255, 2))
    return (lo + (hi - lo) * v).astype(np.uint8)


def _shapes(rng, w: int, h: int) -> Image.Image:
    """Random coloured ellipses and rectangles on a coloured background."""
    image = Image.new("RGB", (w, h), _colour(rng))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(5, 30)):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = (x0, y0, x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2)))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=_colour(rng))
    return image


def colour_scene(rng):
    """Photograph-like: coloured shapes, a little blur and sensor noise."""
    w, h = _size(rng)
    image = np.asarray(_shapes(rng, w, h).filter(ImageFilter.GaussianBlur(rng.uniform(0, 3))), np.float32)
    return np.clip(image + rng.normal(0, 4, (h, w, 3)), 0, 255).astype(np.uint8)


def blurred(rng):
    """A scene blurred far beyond any film, or a few random pixels scaled up."""
    w, h = _size(rng)
    if rng.random() < 0.5:
        scene = _shapes(rng, w, h)
        scene = scene if rng.random() < 0.5 else scene.convert("L")
        return np.asarray(scene.filter(ImageFilter.GaussianBlur(rng.uniform(15, 40))))
    side = int(rng.integers(3, 10))
    tiny = Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8))
    return np.asarray(tiny.resize((w, h), Image.Resampling.BICUBIC))


def text_page(rng):
    w, h = _size(rng, 500, 1400)
    page = Image.new("L", (w, h), int(rng.integers(200, 256)))
    draw = ImageDraw.Draw(page)
    size, margin = int(rng.integers(10, 28)), int(rng.integers(10, 80))
    font = ImageFont.load_default(size=size)
    for row in range(margin, h - margin, int(size * rng.uniform(1.2, 2.0))):
        line = " ".join(rng.choice(_WORDS, int(rng.integers(4, 14))))
        draw.text((margin, row), line, fill=int(rng.integers(0, 80)), font=font)
    return np.asarray(page)


def noise(rng):
    """Uniform, Gaussian, salt-and-pepper, or smooth (value) noise."""
    w, h = _size(rng)
    kind = rng.integers(4)
    if kind == 0:
        return rng.integers(0, 256, (h, w), dtype=np.uint8)
    if kind == 1:
        return np.clip(rng.normal(rng.uniform(60, 200), rng.uniform(10, 60), (h, w)), 0, 255).astype(np.uint8)
    if kind == 2:
        return (rng.random((h, w)) < rng.uniform(0.05, 0.5)).astype(np.uint8) * 255
    side = int(rng.integers(8, 64))
    smooth = Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8)).resize(
        (w, h), Image.Resampling.BICUBIC
    )
    return np.clip(np.asarray(smooth, np.float32) + rng.normal(0, 10, (h, w)), 0, 255).astype(np.uint8)


def _pick(films, rng):
    return films[int(rng.integers(len(films)))]


def _resize(a: np.ndarray, w: int, h: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize((w, h), Image.Resampling.BILINEAR))


def rotated(films, rng):
    return np.ascontiguousarray(np.rot90(_pick(films, rng), int(rng.integers(1, 4))))


def inverted(films, rng):
    return 255 - _pick(films, rng)


def monitor_photo(films, rng):
    """A photograph of a monitor showing a film: a room, a bright or dark bezel, moire, glare, a colour
    cast and a perspective warp."""
    film = _pick(films, rng)
    w, h = _size(rng, 800, 1600)
    room = np.asarray(_shapes(rng, w, h).filter(ImageFilter.GaussianBlur(8)), np.float32)
    bw, bh = int(w * rng.uniform(0.6, 0.9)), int(h * rng.uniform(0.6, 0.9))
    bezel = np.full((bh, bw, 3), rng.uniform(150, 240) if rng.random() < 0.5 else rng.uniform(10, 50), np.float32)
    sw, sh = int(bw * 0.9), int(bh * 0.88)
    screen = np.full((sh, sw, 3), 10, np.float32)
    fw = min(sw, int(sh * film.shape[1] / film.shape[0]))
    screen[:, (sw - fw) // 2 : (sw - fw) // 2 + fw] = _resize(film, fw, sh)[..., None]
    yy, xx = np.mgrid[0:sh, 0:sw]
    screen *= 1 + 0.08 * np.sin(2 * np.pi * (xx + 0.3 * yy) / rng.uniform(3, 7))[..., None]  # moire
    gx, gy = sw * rng.uniform(0.2, 0.8), sh * rng.uniform(0.2, 0.8)
    screen += 120 * np.exp(-(((xx - gx) / (sw * 0.25)) ** 2 + ((yy - gy) / (sh * 0.25)) ** 2))[..., None]  # glare
    screen *= rng.uniform(0.9, 1.1, 3)
    bezel[(bh - sh) // 2 : (bh - sh) // 2 + sh, (bw - sw) // 2 : (bw - sw) // 2 + sw] = screen
    x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
    room[y0 : y0 + bh, x0 : x0 + bw] = bezel
    corners = np.array([0, 0, 0, h, w, h, w, 0], float) + rng.uniform(-0.08, 0.08, 8) * np.array([w, h] * 4)
    photo = Image.fromarray(np.clip(room, 0, 255).astype(np.uint8))
    return np.asarray(photo.transform((w, h), Image.Transform.QUAD, corners.tolist(), Image.Resampling.BILINEAR))


def page_screenshot(films, rng):
    """A screenshot of a web page: a title bar, buttons, text, and a film taking 30-55% of the width."""
    film = _pick(films, rng)
    w, h = int(rng.integers(1000, 1920)), int(rng.integers(700, 1200))
    page = Image.new("RGB", (w, h), _colour(rng, 200, 256))
    draw = ImageDraw.Draw(page)
    draw.rectangle((0, 0, w, int(rng.integers(30, 70))), fill=_colour(rng, 0, 120))
    font = ImageFont.load_default(size=int(rng.integers(11, 20)))
    fw = int(w * rng.uniform(0.3, 0.55))
    fh = min(h - 120, int(fw * film.shape[0] / film.shape[1]))
    fx, fy = int(rng.integers(20, w - fw - 20)), int(rng.integers(80, max(81, h - fh - 10)))
    for b in range(int(rng.integers(2, 6))):
        draw.rectangle((20 + 150 * b, 45, 150 + 150 * b, 75), fill=_colour(rng, 40, 220))
    text_x = 20 if fx > w / 2 else fx + fw + 20
    for row in range(90, h - 20, 22):
        draw.text((text_x, row), " ".join(rng.choice(_WORDS, 6)), fill=(30, 30, 30), font=font)
    page.paste(Image.fromarray(_resize(film, fw, fh)).convert("RGB"), (fx, fy))
    return np.asarray(page)


def side_by_side(films, rng):
    """Two films next to each other, with or without a gap."""
    a, b = _pick(films, rng), _pick(films, rng)
    h = int(rng.integers(400, 1200))
    a, b = (_resize(f, int(h * f.shape[1] / f.shape[0]), h) for f in (a, b))
    gap = np.full((h, int(rng.integers(0, 60))), int(rng.integers(0, 256)), np.uint8)
    return np.hstack([a, gap, b])


def one_lung(films, rng):
    """The left or right 40-50% of a film."""
    film = _pick(films, rng)
    h, w = film.shape
    cut = int(w * rng.uniform(0.4, 0.5))
    top, bottom = int(h * rng.uniform(0, 0.15)), int(h * rng.uniform(0.85, 1))
    return np.ascontiguousarray(film[top:bottom, :cut] if rng.random() < 0.5 else film[top:bottom, w - cut :])


# Degraded real films: each takes one film (uint8 grey) and a numpy Generator.


def colour_tint(film, rng):
    tint = rng.uniform(0.3, 1.0, 3)
    tint[rng.integers(3)] = 1.0
    return (film[..., None] * tint).astype(np.uint8)


def strong_gamma(film, rng):
    gamma = rng.choice([0.35, 0.45, 2.2, 2.8])
    return (255 * (film / 255.0) ** gamma).astype(np.uint8)


def brightened(film, rng):
    return np.clip(film * rng.uniform(1.4, 1.8) + rng.uniform(20, 60), 0, 255).astype(np.uint8)


def darkened(film, rng):
    return (film * rng.uniform(0.3, 0.5)).astype(np.uint8)


def heavy_blur(film, rng):
    sigma = film.shape[1] / 224 * rng.uniform(4, 8)
    return np.asarray(Image.fromarray(film).filter(ImageFilter.GaussianBlur(sigma)))


def text_overlay(film, rng):
    im = Image.fromarray(film)
    draw = ImageDraw.Draw(im)
    h, w = film.shape
    font = ImageFont.load_default(size=int(w / rng.uniform(10, 16)))
    for _ in range(int(rng.integers(2, 5))):
        xy = (int(rng.integers(0, w // 2)), int(rng.integers(0, h - h // 8)))
        draw.text(xy, " ".join(rng.choice(_WORDS, 2)).upper(), fill=int(rng.choice([0, 255])), font=font)
    return np.asarray(im)


def wide_padding(film, rng):
    h, w = film.shape
    f = rng.uniform(1.8, 2.2)
    canvas = np.full((int(h * f), int(w * f)), int(rng.choice([0, 255])), np.uint8)
    y, x = int(rng.integers(0, canvas.shape[0] - h)), int(rng.integers(0, canvas.shape[1] - w))
    canvas[y : y + h, x : x + w] = film
    return canvas


GENERATED = {
    "flat field": flat,
    "gradient": gradient,
    "vignette": vignette,
    "blurred or downscaled scene": blurred,
    "text page": text_page,
    "noise": noise,
    "colour scene": colour_scene,
}
FROM_FILMS = {
    "rotated film": rotated,
    "inverted film": inverted,
    "photo of a monitor": monitor_photo,
    "page screenshot": page_screenshot,
    "two films side by side": side_by_side,
    "one-lung crop": one_lung,
}
DEGRADED = {
    "colour tint": colour_tint,
    "strong gamma": strong_gamma,
    "brightened": brightened,
    "darkened": darkened,
    "heavy blur": heavy_blur,
    "text overlay": text_overlay,
    "wide padding": wide_padding,
}


def generate(kind: str, n: int, seed: int, films: list[np.ndarray] | None = None) -> dict[str, bytes]:
    """``n`` inputs of one generated kind, PNG or JPEG at random; DEGRADED kinds are keyed by the index
    of the film they degrade (``films[i]``)."""
    rng = np.random.default_rng([seed, sorted([*GENERATED, *FROM_FILMS, *DEGRADED]).index(kind)])
    out = {}
    for i in range(n):
        if kind in GENERATED:
            image = GENERATED[kind](rng)
        elif kind in FROM_FILMS:
            image = FROM_FILMS[kind](films, rng)
        else:
            image = DEGRADED[kind](films[i % len(films)], rng)
        fmt = "JPEG" if rng.random() < 0.5 else "PNG"
        out[f"{kind} {i}.{fmt.lower()}"] = enc(np.ascontiguousarray(image), fmt)
    return out
