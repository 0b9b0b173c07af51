"""Generators of unusual and broken inputs, built from one real X-ray (few committed binaries)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "src" / "pneumoscan" / "examples"


def _real_224() -> Path:
    """One real X-ray as the shared 224 px set stores them (224x224 RGB JPEG, aspect squashed), made from
    an example image shipped in the package: tests need no dataset to have it."""
    from conftest import scratch_dir

    from pneumoscan.io.images import prepare

    path = scratch_dir("pneumoscan-corpus-") / "person1946_bacteria_4874.jpeg"
    grey = prepare(EXAMPLES / "PNEUMONIA" / path.name, 224)
    Image.fromarray(grey).convert("RGB").save(path, "JPEG", quality=95)
    return path


REAL = _real_224()


def real_grey() -> np.ndarray:
    return np.asarray(Image.open(REAL).convert("L"))


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def png16(grey: np.ndarray) -> bytes:
    return encode(Image.fromarray(grey.astype(np.uint16) * 257), "PNG")


def exif_rotated(grey: np.ndarray) -> bytes:
    """The image stored rotated by 90 degrees with EXIF orientation 6 (display: rotate back)."""
    stored = Image.fromarray(np.rot90(grey, 1))  # counter-clockwise; orientation 6 turns it clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def bomb_png(width: int = 60000, height: int = 60000) -> bytes:
    """A valid PNG header claiming a huge image, with no real pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    )


def dicom(
    grey: np.ndarray,
    photometric: str = "MONOCHROME2",
    pixels: bool = True,
    syntax: str | None = None,
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] = (1.0, 0.0),
) -> bytes:
    """A DICOM file of ``grey``'s intensities stored as 12-bit values (0-255 onto 0-4095, so a viewer shows
    the same pixels); MONOCHROME1 stores it inverted."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    values = np.rint(grey * (4095 / 255)).astype(np.uint16)  # the same intensities over 0..4095
    if photometric == "MONOCHROME1":
        values = 4095 - values
    slope, intercept = rescale
    stored = np.floor((values - intercept) / slope).astype(np.uint16)  # rescaled back: within the stored range
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "CR", "TEST"
    ds.Rows, ds.Columns = grey.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if pixels:
        ds.PixelData = stored.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def encapsulated_dicom(
    frame: bytes, syntax: str, rows: int, columns: int, samples: int = 1, bits: int = 8, photometric: str = ""
) -> bytes:
    """A DICOM file holding one compressed ``frame`` under ``syntax``; its header states ``rows`` x ``columns``
    whatever the frame holds (as a hostile or broken peer would write it)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "CR", "TEST"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric or ("MONOCHROME2" if samples == 1 else "YBR_FULL_422")
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def with_frame_size(codestream: bytes, width: int, height: int) -> bytes:
    """A JPEG (SOF) or JPEG 2000 (SIZ, with one tile) codestream whose header claims ``width`` x ``height``."""
    import struct

    data = bytearray(codestream)
    if data.startswith(b"\xff\xd8"):
        pos = 2
        while not (0xC0 <= data[pos + 1] <= 0xCF and data[pos + 1] not in (0xC4, 0xC8, 0xCC)) and data[pos + 1] != 0xF7:
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        data[pos + 5 : pos + 9] = struct.pack(">HH", height, width)
        return bytes(data)
    at = data.find(b"\xff\x4f\xff\x51") + 4
    data[at + 4 : at + 12] = struct.pack(">II", width, height)  # Xsiz, Ysiz (offsets 0)
    data[at + 20 : at + 28] = struct.pack(">II", width, height)  # one tile of the whole image
    return bytes(data)
