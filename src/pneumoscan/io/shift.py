"""Acquisition shift, imitated: fixed, seeded perturbations of prepared X-rays.

Another scanner, another exposure, another processing chain: validation images under these
perturbations are a proxy for images from elsewhere. The input gate's limit admits them, and recipes can
be ranked on them without touching the test split. Each perturbation takes and returns uint8 ``(S, S)``.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter


def _pil(f: Callable[[Image.Image], Image.Image]) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    return lambda a, rng: np.asarray(f(Image.fromarray(a, "L")), dtype=np.uint8)


def _levels(f: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    return lambda a, rng: np.clip(np.rint(f(a.astype(np.float32))), 0, 255).astype(np.uint8)


def _jpeg(quality: int) -> Callable[[Image.Image], Image.Image]:
    def encode(image: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=quality)
        return Image.open(buf).convert("L")

    return encode


def _resolution(factor: float) -> Callable[[Image.Image], Image.Image]:
    def resample(image: Image.Image) -> Image.Image:
        small = image.resize((max(8, round(image.width * factor)), max(8, round(image.height * factor))))
        return small.resize(image.size, Image.Resampling.BILINEAR)

    return resample


def _noise(sigma: float):
    return lambda a, rng: np.clip(a + rng.normal(0, sigma, a.shape), 0, 255).astype(np.uint8)


PERTURBATIONS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "exposure -25%": _levels(lambda a: a * 0.75),
    "exposure +25%": _levels(lambda a: a * 1.25),
    "gamma 0.7": _levels(lambda a: 255 * (a / 255) ** 0.7),
    "gamma 1.4": _levels(lambda a: 255 * (a / 255) ** 1.4),
    "contrast 0.7": _levels(lambda a: (a - a.mean()) * 0.7 + a.mean()),
    "contrast 1.3": _levels(lambda a: (a - a.mean()) * 1.3 + a.mean()),
    "blur 1 px": _pil(lambda im: im.filter(ImageFilter.GaussianBlur(1.0))),
    "blur 2 px": _pil(lambda im: im.filter(ImageFilter.GaussianBlur(2.0))),
    "noise 6": _noise(6.0),
    "resolution 1/2": _pil(_resolution(0.5)),
    "resolution 1/4": _pil(_resolution(0.25)),
    "JPEG quality 30": _pil(_jpeg(30)),
    "JPEG quality 10": _pil(_jpeg(10)),
}


def perturb(images: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Every image under every perturbation: ``{name: (N, S, S) uint8}``, the same for the same seed."""
    out = {}
    for i, (name, f) in enumerate(PERTURBATIONS.items()):
        rng = np.random.default_rng([seed, i])
        out[name] = np.stack([f(image, rng) for image in images]) if len(images) else images.copy()
    return out
