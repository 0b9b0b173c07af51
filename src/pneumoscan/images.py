"""The one image loader, used by training, evaluation, prediction and the service.

Every input becomes an 8-bit grey PIL image: chest X-rays carry no colour, and the model
replicates the grey channel to the three channels its ImageNet backbone expects. Pixel
normalisation lives inside the model (see ``models.py``), so the only preprocessing outside
it is :func:`prepare`: load, then resize to a square of the model's size. The PyTorch and
ONNX paths both start from that uint8 array.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

MAX_PIXELS = 100_000_000  # 10k x 10k; larger headers are refused before decoding (bombs)
MAX_FILE_BYTES = 100 * 1024 * 1024
MIN_SIDE = 16  # smaller than this is no radiograph
DRAFT_OVERSAMPLE = 3  # JPEG draft decoding keeps both sides at least this many times the target size
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".dcm", ".dicom"}

ImageSource = Union[str, os.PathLike, bytes, BinaryIO, Image.Image, np.ndarray]

# We apply our own pixel limit; PIL's bomb check would only warn below twice its own.
Image.MAX_IMAGE_PIXELS = None
# pydicom warns about every malformed tag; the loader's one-line errors say what matters.
warnings.filterwarnings("ignore", module="pydicom")


def source_name(source: ImageSource) -> str:
    """How an input is named in results and error messages."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or "<PIL image>"
    if isinstance(source, np.ndarray):
        return "<array>"
    return getattr(source, "name", "<bytes>")


def load_image(
    source: ImageSource,
    *,
    draft_size: int | None = None,
    max_pixels: int = MAX_PIXELS,
    max_bytes: int = MAX_FILE_BYTES,
) -> Image.Image:
    """Load any supported input as an 8-bit grey image, or raise :class:`ImageError`.

    ``draft_size`` lets the JPEG decoder skip detail that a resize to that size would throw
    away: it decodes at the smallest power-of-two scale that keeps both sides at least
    ``DRAFT_OVERSAMPLE`` times ``draft_size``.
    """
    name = source_name(source)
    try:
        if isinstance(source, Image.Image):
            return _to_grey(source, name)
        if isinstance(source, np.ndarray):
            return _array_to_grey(source, name)
        data = _read_bytes(source, name, max_bytes)
        if _looks_like_dicom(data, name):
            return _load_dicom(data, name, max_pixels)
        return _load_pil(data, name, draft_size, max_pixels)
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is this input's error
        raise ImageError(name, _describe(exc)) from exc


def resize_square(image: Image.Image, size: int) -> np.ndarray:
    """Resize (squashing the aspect ratio, as the Kermany images were) to ``size`` x ``size`` uint8."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.array(image, dtype=np.uint8)


def prepare(source: ImageSource, size: int) -> np.ndarray:
    """Load and resize one input: the model's input as a ``(size, size)`` uint8 array."""
    return resize_square(load_image(source, draft_size=size), size)


def _read_bytes(source, name: str, max_bytes: int) -> bytes:
    if isinstance(source, bytes):
        data = source
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ImageError(name, "no such file")
        if not path.is_file():
            raise ImageError(name, "not a regular file")
        size = path.stat().st_size
        if size > max_bytes:
            raise ImageError(
                name, f"file is {size / 2**20:.1f} MB, over the {max_bytes / 2**20:.0f} MB limit", "too_large"
            )
        try:
            data = path.read_bytes()
        except PermissionError:
            raise ImageError(name, "permission denied") from None
    else:
        data = source.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ImageError(name, f"input is over the {max_bytes / 2**20:.0f} MB limit", "too_large")
    if not data:
        raise ImageError(name, "file is empty")
    return data


def _looks_like_dicom(data: bytes, name: str) -> bool:
    return data[128:132] == b"DICM" or name.lower().endswith((".dcm", ".dicom"))


def _check_pixels(width: int, height: int, name: str, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageError(
            name, f"image is {width}x{height} pixels, over the limit of {max_pixels:,} pixels", "too_large"
        )
    if min(width, height) < MIN_SIDE:
        raise ImageError(name, f"image is {width}x{height} pixels; at least {MIN_SIDE} per side expected")


def _load_pil(data: bytes, name: str, draft_size: int | None, max_pixels: int) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(name, "not a recognised image (expected JPEG, PNG or DICOM)", "unsupported") from None
    _check_pixels(*image.size, name, max_pixels)
    if draft_size and image.format == "JPEG":
        image.draft("L", (DRAFT_OVERSAMPLE * draft_size, DRAFT_OVERSAMPLE * draft_size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # EXIF and ICC oddities are not worth a line each
        image.load()
        image = ImageOps.exif_transpose(image)
    return _to_grey(image, name)


def _to_grey(image: Image.Image, name: str) -> Image.Image:
    if image.mode == "L":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _array_to_grey(np.asarray(image), name)
    if image.mode in ("RGBA", "LA", "PA", "P", "CMYK", "YCbCr", "LAB", "HSV", "1", "RGB", "RGBX"):
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        return image.convert("L")
    raise ImageError(name, f"unsupported pixel mode {image.mode}")


def _array_to_grey(array: np.ndarray, name: str) -> Image.Image:
    """Grey uint8 from an array: HxW, HxWx1, HxWx3 or HxWx4, any integer or float type."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ImageError(name, f"array of shape {np.shape(array)} is not an image (HxW or HxWxC expected)")
    _check_pixels(a.shape[1], a.shape[0], name, MAX_PIXELS)
    if a.dtype != np.uint8:
        a = _scale_to_uint8(a)
    if a.ndim == 3:  # colour: the same luma conversion as for colour files
        return Image.fromarray(np.ascontiguousarray(a[..., :3]), "RGB").convert("L")
    return Image.fromarray(a, "L")


def _scale_to_uint8(a: np.ndarray) -> np.ndarray:
    """Integers keep their scale (white is 65535 for 16-bit data, 4095 for 12-bit, 255 for
    8-bit) so that re-encodings of one image agree; floats in [0, 1] are taken as such;
    anything else is stretched from its minimum to its maximum."""
    lo, hi = float(a.min()), float(a.max())
    if lo < 0:
        return _stretch(a)
    if np.issubdtype(a.dtype, np.floating):
        if hi > 1:
            return _stretch(a)
        full = 1.0
    else:
        full = 65535.0 if hi > 4095 else 4095.0 if hi > 255 else 255.0
    return np.clip(np.rint(a.astype(np.float32) * (255.0 / full)), 0, 255).astype(np.uint8)


def _stretch(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _load_dicom(data: bytes, name: str, max_pixels: int) -> Image.Image:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:  # noqa: BLE001
        raise ImageError(name, f"not a readable DICOM file ({_describe(exc)})", "unsupported") from None
    if "PixelData" not in ds:
        raise ImageError(name, "DICOM file has no pixel data")
    _check_pixels(int(ds.get("Columns", 0)), int(ds.get("Rows", 0)), name, max_pixels)
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        what = f"transfer syntax {syntax.name}" if syntax is not None else "pixel data"
        raise ImageError(
            name, f"DICOM {what} cannot be decoded by the installed handlers ({_describe(exc)})", "unsupported"
        ) from None
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric.startswith("MONOCHROME"):
        pixels = apply_voi_lut(apply_modality_lut(pixels, ds), ds).astype(np.float32)
        if photometric == "MONOCHROME1":
            pixels = pixels.max() + pixels.min() - pixels
        return Image.fromarray(_stretch(pixels), "L")
    return _array_to_grey(pixels, name)


def _describe(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "truncated" in text.lower():
        return "image data are truncated"
    return text[:200]
