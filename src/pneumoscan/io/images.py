"""The one image loader, used by training, evaluation, prediction and the service.

Every input becomes an 8-bit grey PIL image: chest X-rays carry no colour, and the model
replicates the grey channel to the three channels its ImageNet backbone expects. Pixel
normalisation lives inside the model (see ``model/networks.py``), so the only preprocessing outside
it is :func:`prepare`: load, then make the film what the training images were
(:class:`Preprocessing`: squashed to the model's square, then the JPEG round trip the Kermany
224 px copies went through). The PyTorch and ONNX paths, the gate and the heads all start from
that uint8 array.
"""

from __future__ import annotations

import io
import os
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pneumoscan.core.errors import ImageError

MAX_PIXELS = 100_000_000  # 10k x 10k; larger headers are refused before decoding (bombs)
MAX_DECODED_BYTES = 256 * 2**20  # pixel memory one decoded image may take (Pillow: after draft scaling)
MAX_DICOM_BYTES = 64 * 2**20  # DICOM pixel data, all frames (a 4300x4300 16-bit radiograph is 37 MB)
MAX_FILE_BYTES = 100 * 1024 * 1024
MIN_SIDE = 16  # smaller than this is no radiograph
DRAFT_OVERSAMPLE = 4  # JPEG draft decoding keeps both sides at least this many times the target size
SUFFIX_FORMATS = {".jpeg": "jpeg", ".jpg": "jpeg", ".png": "png", ".dcm": "dicom", ".dicom": "dicom"}  # sniff()'s names
IMAGE_SUFFIXES = set(SUFFIX_FORMATS)
PIL_FORMATS = ("JPEG", "PNG")  # the only formats Pillow may decode for us; DICOM goes through pydicom
DEFLATED_DICOM = "1.2.840.10008.1.2.1.99"
UNSUPPORTED = "not a recognised image (expected JPEG, PNG or DICOM)"

# The one preprocessing definition outside the loader: the model itself (models.GreyToImageNet, and so
# its ONNX export) turns uint8 grey (N, 1, S, S) into ImageNet-normalised three-channel input.
NORMALIZATION = {
    "input": "8-bit grey, replicated to 3 channels inside the model",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}

ImageSource = Union[str, os.PathLike, bytes, BinaryIO, Image.Image, np.ndarray]


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
    # No warnings filter here: catch_warnings is process-wide and not thread-safe, and this runs in
    # thread pools. Applications choose what to show (the CLI hides the decoders' chatter).
    try:
        if isinstance(source, Image.Image):
            _check_size(name, *source.size, max_pixels, _bytes_per_pixel(source.mode))
            return _to_grey(source, name)
        if isinstance(source, np.ndarray):
            return _array_to_grey(source, name, max_pixels)
        data = read_bytes(source, name, max_bytes)
        kind = sniff(data, name)
        if kind == "dicom":
            return _load_dicom(data, name, max_pixels)
        if kind is None:
            raise ImageError(name, UNSUPPORTED, "unsupported")
        return _load_pil(data, name, draft_size, max_pixels)
    except ImageError:
        raise
    except MemoryError:
        raise ImageError(name, "not enough memory to decode this image", "too_large") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is this input's error
        raise ImageError(name, _describe(exc)) from exc


RESAMPLING = {"bilinear": Image.Resampling.BILINEAR}  # the kernels a bundle may name
KERMANY_JPEG_QUALITY = 75  # the Kermany 224 px copies: Pillow bilinear to 224 x 224, then JPEG quality 75


@dataclass(frozen=True)
class Preprocessing:
    """How a film becomes the model's input, as a bundle records it (``config.json`` "preprocessing"): squashed
    to ``size`` x ``size`` with ``resample`` (the aspect ratio is not kept, as in the Kermany copies), then, for a
    film that had to be resized, one JPEG round trip at ``jpeg_quality``, the step the training copies went
    through. An input already at the model's size is taken as such a copy and used as it is. ``jpeg_quality``
    None: no round trip (bundles written before this was recorded)."""

    size: int
    resample: str = "bilinear"
    jpeg_quality: int | None = KERMANY_JPEG_QUALITY

    def apply(self, image: Image.Image) -> np.ndarray:
        """The model's input from a loaded grey image: a ``(size, size)`` uint8 array."""
        if image.size == (self.size, self.size):
            return np.array(image, dtype=np.uint8)
        image = image.resize((self.size, self.size), RESAMPLING[self.resample])
        if self.jpeg_quality is not None:
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=self.jpeg_quality)
            image = Image.open(buffer)
            image.load()
        return np.array(image, dtype=np.uint8)

    def record(self) -> dict:
        """What config.json stores (image_size is recorded beside it)."""
        return {"resample": self.resample, "jpeg_quality": self.jpeg_quality}

    @classmethod
    def of_config(cls, config: dict) -> Preprocessing:
        """A bundle's preprocessing: its record, or for a bundle without one, resizing alone (as it was made)."""
        recorded = config.get("preprocessing")
        if recorded is None:
            return cls(int(config["image_size"]), jpeg_quality=None)
        return cls(int(config["image_size"]), recorded["resample"], recorded["jpeg_quality"])


def preprocessing_of(spec: int | Preprocessing) -> Preprocessing:
    """A size alone means the canonical preprocessing at that size (what training writes into new bundles)."""
    return spec if isinstance(spec, Preprocessing) else Preprocessing(int(spec))


def prepare(source: ImageSource, spec: int | Preprocessing) -> np.ndarray:
    """Load one input and make it the model's input: a ``(size, size)`` uint8 array (:class:`Preprocessing`)."""
    return prepare_with_chroma(source, spec)[0]


def prepare_with_chroma(source: ImageSource, spec: int | Preprocessing) -> tuple[np.ndarray, float]:
    """:func:`prepare`, and how colourful the input was before it became grey (0 for grey inputs)."""
    preprocessing = preprocessing_of(spec)
    image = load_image(source, draft_size=preprocessing.size)
    return preprocessing.apply(image), float(image.info.get(CHROMA, 0.0))


def read_bytes(source, name: str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a path, bytes or binary stream, at most ``max_bytes`` of them. A path must be a
    regular file (checked on the opened descriptor: a FIFO, a device or a link to one never hangs or
    floods memory)."""
    if isinstance(source, bytes):
        data = source
    elif isinstance(source, (str, os.PathLike)):
        data = _read_regular_file(Path(source), name, max_bytes)
    else:
        data = source.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ImageError(name, f"input is over the {max_bytes / 2**20:.0f} MB limit", "too_large")
    if not data:
        raise ImageError(name, "file is empty")
    return data


def _read_regular_file(path: Path, name: str, max_bytes: int) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ImageError(name, "no such file") from None
    except PermissionError:
        raise ImageError(name, "permission denied") from None
    except OSError as exc:
        raise ImageError(name, f"cannot be opened ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageError(name, "not a regular file")
        if info.st_size > max_bytes:
            raise ImageError(
                name, f"file is {info.st_size / 2**20:.1f} MB, over the {max_bytes / 2**20:.0f} MB limit", "too_large"
            )
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise ImageError(name, f"cannot be read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:  # grew while we read it
        raise ImageError(name, f"file is over the {max_bytes / 2**20:.0f} MB limit", "too_large")
    return data


def sniff(data: bytes, name: str) -> str | None:
    """What the bytes are, by their content: ``"jpeg"``, ``"png"``, ``"dicom"`` or None. A name
    ending in .dcm only counts for DICOM files without the 128-byte preamble, which have no magic."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data[128:132] == b"DICM" or name.lower().endswith((".dcm", ".dicom")):
        return "dicom"
    return None


def _bytes_per_pixel(mode: str) -> int:
    if mode in ("I", "F"):
        return 4
    if mode.startswith("I;16"):
        return 2
    try:
        return Image.getmodebands(mode)
    except (KeyError, ValueError):
        return 4


def _check_size(
    name: str,
    width: int,
    height: int,
    max_pixels: int,
    bytes_per_pixel: int = 1,
    frames: int = 1,
    max_bytes: int = MAX_DECODED_BYTES,
    working: int = 0,
    working_what: str = "",
) -> None:
    """Refuse, from the header alone, images too small to be radiographs or too large to decode safely.
    ``working``: bytes the decoder holds besides its output (``working_what`` says what they are)."""
    if width * height > max_pixels:
        raise ImageError(
            name, f"image is {width}x{height} pixels, over the limit of {max_pixels:,} pixels", "too_large"
        )
    decoded = frames * width * height * bytes_per_pixel + working
    if decoded > max_bytes:
        extra = f", plus {working / 2**20:.0f} MB of {working_what}" if working else ""
        raise ImageError(
            name,
            f"decoding it would take {decoded / 2**20:.0f} MB ({frames} frame(s) of {width}x{height}{extra}), "
            f"over the {max_bytes / 2**20:.0f} MB limit",
            "too_large",
        )
    if min(width, height) < MIN_SIDE:
        raise ImageError(name, f"image is {width}x{height} pixels; at least {MIN_SIDE} per side expected")


def _peak_bytes_per_pixel(mode: str) -> int:
    """Bytes per pixel held at the peak of decoding an image of this mode and turning it into 8-bit grey:
    the decoded pixels plus the grey copy, or, for 16-bit and float modes, the array copies of the
    intensity mapping (a copy of the pixels, float32, then uint8)."""
    if mode == "L":
        return 1
    if mode in ("I", "F") or mode.startswith("I;16"):
        return 2 * _bytes_per_pixel(mode) + 4 + 1
    return _bytes_per_pixel(mode) + 1


@dataclass(frozen=True)
class FrameHeader:
    """What a compressed codestream says about itself, read from its own header before any decoding."""

    width: int
    height: int
    components: int
    bits: int
    working: int = 0  # bytes the decoder holds besides its output
    working_what: str = ""

    @property
    def bytes_per_sample(self) -> int:
        return -(-self.bits // 8)


# JPEG start-of-frame markers (all DCT and lossless processes) and JPEG-LS's SOF55.
_JPEG_SOF = {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7}
_JPEG_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}
_JPEG_LOSSLESS = {0xC3, 0xC7, 0xCB, 0xCF, 0xF7}


def jpeg_header(data: bytes) -> FrameHeader | None:
    """The frame header (SOF) of a JPEG, JPEG lossless or JPEG-LS codestream, or None if there is none
    before the first scan. Progressive files, and files whose first scan does not hold every component,
    are decoded by libjpeg through a buffer of all their DCT coefficients (2 bytes each, at full size
    whatever the output scale): ``working`` counts it."""
    if not data.startswith(b"\xff\xd8"):
        return None
    pos, sof, marker_of_frame = 2, None, 0
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        if marker == 0xD9:
            break
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        segment = data[pos + 4 : pos + 2 + length]
        if length < 2 or len(segment) != length - 2:
            return None
        if marker in _JPEG_SOF and sof is None:
            if len(segment) < 6:
                return None
            count = segment[5]
            components = [segment[6 + 3 * i : 9 + 3 * i] for i in range(count)]
            if count == 0 or any(len(c) != 3 for c in components):
                return None
            sof = (segment[0], int.from_bytes(segment[1:3], "big"), int.from_bytes(segment[3:5], "big"), components)
            marker_of_frame = marker
        elif marker == 0xDA:  # start of scan: entropy-coded data follow
            if sof is None or not segment:
                return None
            bits, height, width, components = sof
            multiscan = marker_of_frame in _JPEG_PROGRESSIVE or (
                marker_of_frame not in _JPEG_LOSSLESS and segment[0] < len(components)
            )
            working = _jpeg_coefficient_bytes(width, height, components) if multiscan else 0
            what = "progressive JPEG coefficients" if marker_of_frame in _JPEG_PROGRESSIVE else "JPEG coefficients"
            return FrameHeader(width, height, len(components), bits, working, what)
        pos += 2 + length
    return None


def _jpeg_coefficient_bytes(width: int, height: int, components: list[bytes]) -> int:
    """libjpeg's whole-image coefficient buffer: 64 coefficients of 2 bytes per 8x8 block of each component."""
    h_max = max(c[1] >> 4 for c in components) or 1
    v_max = max(c[1] & 15 for c in components) or 1
    total = 0
    for c in components:
        h, v = (c[1] >> 4) or 1, (c[1] & 15) or 1
        total += _ceil_div(_ceil_div(width * h, h_max), 8) * _ceil_div(_ceil_div(height * v, v_max), 8) * 128
    return total


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def j2k_header(data: bytes) -> FrameHeader | None:
    """The image and tile size (SIZ marker) of a JPEG 2000 codestream, raw or in a JP2 file. OpenJPEG
    decodes into 32-bit buffers for every component: ``working`` counts them."""
    at = data.find(b"\xff\x4f\xff\x51", 0, 1 << 16)
    siz = data[at + 4 : at + 4 + 38] if at >= 0 else b""
    if len(siz) < 38:
        return None
    numbers = [int.from_bytes(siz[i : i + 4], "big") for i in range(4, 36, 4)]
    x, y, x0, y0 = numbers[:4]
    count = int.from_bytes(siz[36:38], "big")
    sizes = data[at + 42 : at + 42 + 3 * count]
    if count == 0 or len(sizes) != 3 * count or x <= x0 or y <= y0:
        return None
    bits = max((sizes[3 * i] & 0x7F) + 1 for i in range(count))
    width, height = x - x0, y - y0
    return FrameHeader(width, height, count, bits, 4 * width * height * count, "JPEG 2000 decoder buffers")


def rle_decoded_bytes(frame: bytes, stop_after: int) -> int:
    """How many bytes DICOM RLE segments decode to (PackBits), counted without decoding; counting
    stops once it passes ``stop_after``."""
    if len(frame) < 64:
        return 0
    count = int.from_bytes(frame[:4], "little")
    offsets = [int.from_bytes(frame[4 + 4 * i : 8 + 4 * i], "little") for i in range(min(count, 15))]
    ends = [*offsets[1:], len(frame)]
    total = 0
    for start, end in zip(offsets, ends):
        pos, end = start, min(end, len(frame))
        while pos < end - 1 and total <= stop_after:  # a control byte with nothing after it unpacks to nothing
            control = frame[pos]
            if control > 128:  # a run: the next byte, 257 - control times
                total += 257 - control
                pos += 2
            elif control < 128:  # a literal: the next control + 1 bytes (as many as there are)
                total += min(control + 1, end - pos - 1)
                pos += control + 2
            else:
                pos += 1
    return total


def _load_pil(data: bytes, name: str, draft_size: int | None, max_pixels: int) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
    except UnidentifiedImageError:
        raise ImageError(name, UNSUPPORTED, "unsupported") from None
    except Image.DecompressionBombError:
        raise ImageError(name, f"image is over the limit of {max_pixels:,} pixels", "too_large") from None
    _check_size(name, *image.size, max_pixels)
    header = jpeg_header(data) if image.format == "JPEG" else None
    if draft_size and image.format in ("JPEG", "MPO"):
        image.draft("L", (DRAFT_OVERSAMPLE * draft_size, DRAFT_OVERSAMPLE * draft_size))
    working, what = (header.working, header.working_what) if header else (0, "")
    _check_size(name, *image.size, max_pixels, _peak_bytes_per_pixel(image.mode), working=working, working_what=what)
    image.load()
    image = ImageOps.exif_transpose(image)
    return _to_grey(image, name)


GREY_MODES = ("L", "LA", "La", "1", "I;16", "I;16B", "I;16L", "I;16N", "I", "F")
COLOUR_MODES = ("RGB", "RGBA", "RGBX", "RGBa", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV")
CHROMA = "pneumoscan_chroma"  # Image.info key: the mean chroma (0-1) of a colour input, 0 for grey ones


def _to_grey(image: Image.Image, name: str) -> Image.Image:
    if image.mode == "L":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _array_to_grey(np.asarray(image), name)
    if image.mode in GREY_MODES:
        return image.convert("L")
    if image.mode in COLOUR_MODES:
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        return colour_to_grey(image.convert("RGB"))
    raise ImageError(name, f"unsupported pixel mode {image.mode}")


def colour_to_grey(rgb: Image.Image) -> Image.Image:
    """The one colour-to-grey conversion, for files, arrays and DICOM alike: ITU-R 601 luma
    (0.299 R + 0.587 G + 0.114 B, Pillow's "L"). How colourful the input was (mean of max - min channel
    over a thumbnail, 0-1) stays in the grey image's ``info[CHROMA]``: a tinted film is warned about."""
    small = rgb.reduce(max(1, min(rgb.size) // 64))
    channels = np.asarray(small, dtype=np.int16)
    chroma = float((channels.max(axis=2) - channels.min(axis=2)).mean() / 255)
    grey = rgb.convert("L")
    grey.info[CHROMA] = chroma
    return grey


def _array_to_grey(array: np.ndarray, name: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Grey uint8 from an array: HxW, HxWx1, HxWx3 or HxWx4, any integer or float type."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ImageError(name, f"array of shape {np.shape(array)} is not an image (HxW or HxWxC expected)")
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating) or a.dtype == bool):
        raise ImageError(name, f"array of type {a.dtype} is not an image (integers or floats expected)")
    _check_size(name, a.shape[1], a.shape[0], max_pixels)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.dtype != np.uint8:
        if not np.isfinite(a).all():
            raise ImageError(name, "array holds NaN or infinite values")
        a = _scale_to_uint8(a)
    if a.ndim == 3:  # colour: the same luma conversion as for colour files
        return colour_to_grey(Image.fromarray(np.ascontiguousarray(a[..., :3]), "RGB"))
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


def _check_deflated_dicom(data: bytes, name: str) -> None:
    """pydicom inflates a deflated dataset whole, before anything can be checked: bound that first."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    stream = io.BytesIO(data)
    try:
        read_preamble(stream, True)
        meta = _read_file_meta_info(stream)
        syntax = str(meta.get("TransferSyntaxUID", ""))
    except Exception:  # noqa: BLE001 - a broken header is pydicom's to report
        return
    if syntax != DEFLATED_DICOM:
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = len(inflater.decompress(data[stream.tell() :], MAX_DICOM_BYTES + 1))
    except zlib.error as exc:
        raise ImageError(name, f"not a readable DICOM file (deflated data: {exc})") from None
    if inflated > MAX_DICOM_BYTES:
        raise ImageError(
            name, f"deflated DICOM data inflate past the {MAX_DICOM_BYTES / 2**20:.0f} MB limit", "too_large"
        )


def _dicom_geometry(ds) -> tuple[int, int, int, int]:
    """(columns, rows, frames, bytes per pixel) from the header, before any pixel is decoded."""

    def number(key: str, default: int) -> int:
        value = ds.get(key, default)
        try:
            return int(value if value not in (None, "") else default)
        except (TypeError, ValueError):
            return default

    bits = number("BitsAllocated", 16)
    samples = number("SamplesPerPixel", 1)
    return number("Columns", 0), number("Rows", 0), max(1, number("NumberOfFrames", 1)), max(1, samples * -(-bits // 8))


JPEG_SYNTAXES = {f"1.2.840.10008.1.2.4.{n}" for n in (50, 51, 57, 70, 80, 81)}  # baseline ... JPEG-LS
J2K_SYNTAXES = {f"1.2.840.10008.1.2.4.{n}" for n in (90, 91, 92, 93, 201, 202, 203)}  # JPEG 2000, HTJ2K
RLE_SYNTAX = "1.2.840.10008.1.2.5"


def _first_frame(ds, name: str, frames: int) -> bytes:
    from pydicom.encaps import generate_frames

    try:
        return next(generate_frames(ds.PixelData, number_of_frames=frames))
    except Exception as exc:  # noqa: BLE001 - a broken encapsulation is this input's error
        raise ImageError(name, f"DICOM compressed pixel data cannot be read ({_describe(exc)})") from None


def _check_encapsulated_frame(ds, name: str, columns: int, rows: int, frames: int, max_pixels: int) -> None:
    """A compressed frame is decoded to the size its own codestream states, whatever the DICOM header says:
    read that size (JPEG SOF, JPEG-LS SOF55, JPEG 2000 SIZ; for RLE, the bytes its segments unpack to) and
    refuse, before any decoder runs, a frame that differs from the header or would take too much memory."""
    meta = getattr(ds, "file_meta", None)
    syntax = str(getattr(meta, "TransferSyntaxUID", "") or "")
    if syntax in ("", DEFLATED_DICOM) or not getattr(meta.TransferSyntaxUID, "is_encapsulated", False):
        return
    if syntax not in JPEG_SYNTAXES | J2K_SYNTAXES | {RLE_SYNTAX}:
        raise ImageError(name, f"DICOM transfer syntax {meta.TransferSyntaxUID.name} is not one this loader decodes")
    frame = _first_frame(ds, name, frames)
    samples = max(1, int(ds.get("SamplesPerPixel", 1) or 1))
    if syntax == RLE_SYNTAX:
        expected = columns * rows * samples * -(-int(ds.get("BitsAllocated", 16) or 16) // 8)
        if rle_decoded_bytes(frame, expected) > expected:
            raise ImageError(
                name, f"RLE frame unpacks to more than the {columns}x{rows} pixels its header states", "too_large"
            )
        return
    header = jpeg_header(frame) if syntax in JPEG_SYNTAXES else j2k_header(frame)
    if header is None:
        raise ImageError(
            name, f"DICOM {meta.TransferSyntaxUID.name} frame cannot be decoded: it has no readable size header"
        )
    _check_size(
        name,
        header.width,
        header.height,
        max_pixels,
        header.components * header.bytes_per_sample,
        working=header.working,
        working_what=header.working_what,
    )
    if (header.width, header.height) != (columns, rows) or header.components != samples:
        raise ImageError(
            name,
            f"DICOM compressed frame is {header.width}x{header.height} with {header.components} component(s) "
            f"but its header states {columns}x{rows} with {samples}",
        )


def _load_dicom(data: bytes, name: str, max_pixels: int) -> Image.Image:
    import pydicom

    _check_deflated_dicom(data, name)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:  # noqa: BLE001
        # DICOM by its magic, but unreadable: an unusable image; by its name alone: not an image we know
        kind = "invalid" if data[128:132] == b"DICM" else "unsupported"
        raise ImageError(name, f"not a readable DICOM file ({_describe(exc)})", kind) from None
    if "PixelData" not in ds:
        raise ImageError(name, "DICOM file has no pixel data")
    columns, rows, frames, depth = _dicom_geometry(ds)
    _check_size(name, columns, rows, max_pixels, depth, frames, MAX_DICOM_BYTES)
    _check_encapsulated_frame(ds, name, columns, rows, frames, max_pixels)
    try:
        ds.pixel_array_options(index=0)  # classification reads the first frame only
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        what = f"transfer syntax {syntax.name}" if syntax is not None else "pixel data"
        raise ImageError(name, f"DICOM {what} cannot be decoded by the installed handlers ({_describe(exc)})") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric.startswith("MONOCHROME"):
        return Image.fromarray(dicom_to_uint8(ds, pixels), "L")
    return _array_to_grey(pixels, name, max_pixels)


def dicom_to_uint8(ds, pixels: np.ndarray) -> np.ndarray:
    """A monochrome DICOM frame as the model's 8-bit grey, as a viewer would display it (no contrast
    stretch of its own, so the same pixels as PNG or JPEG give the same input):

    1. the modality LUT (Rescale Slope and Intercept, or a Modality LUT Sequence);
    2. the VOI: a VOI LUT Sequence, else the first Window Center/Width (LINEAR, LINEAR_EXACT or SIGMOID),
       each mapped onto 0-1 over its output range; without either, the range the stored bits can hold
       (0 to 2**BitsStored - 1, or the signed range; through the rescale where the values leave it) maps
       onto 0-1, as an 8- or 16-bit PNG of the same values does;
    3. MONOCHROME1 (white is low) is inverted: 1 - value;
    4. x 255, rounded: 8-bit grey.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
    if "VOILUTSequence" in ds:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        unit = np.asarray(apply_voi_lut(values, ds, prefer_lut=True), np.float64) / (2**bits - 1)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        unit = _window(values, ds)
    else:
        lo, hi = _stored_range(ds, values)
        unit = (values - lo) / max(hi - lo, 1e-12)
    unit = np.clip(unit, 0, 1)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        unit = 1 - unit
    return np.rint(unit * 255).astype(np.uint8)


def _first(value) -> float:
    """The first of a multi-valued DICOM number (several windows may be offered), or the number."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def _window(values: np.ndarray, ds) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing of modality values onto 0-1."""
    center, width = _first(ds.WindowCenter), max(_first(ds.WindowWidth), 1.0)
    function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
    if function == "SIGMOID":
        return 1 / (1 + np.exp(-4 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return (values - center) / width + 0.5
    return (values - (center - 0.5)) / max(width - 1, 1.0) + 0.5


def _stored_range(ds, values: np.ndarray) -> tuple[float, float]:
    """The range that maps onto black to white without a VOI: 0 to 2**BitsStored - 1 (the signed range
    for signed data) where every modality value lies in it, so a rescale that only changes units changes
    nothing; else that range through the rescale."""
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if lo <= values.min() and values.max() <= hi:
        return lo, hi
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    ends = sorted((lo * slope + intercept, hi * slope + intercept))
    return ends[0], ends[1]


def _describe(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "truncated" in text.lower():
        return "image data are truncated"
    return text[:200]
