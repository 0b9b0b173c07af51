import os

import numpy as np
import pytest
from corpus import REAL, bomb_png, dicom, encode, exif_rotated, png16, real_grey, write
from PIL import Image

from pneumoscan.core.errors import ImageError
from pneumoscan.io.images import load_image, prepare


@pytest.fixture(scope="module")
def grey():
    return real_grey()


def _close(a: np.ndarray, b: np.ndarray, tol: float = 2.0) -> bool:
    return np.abs(a.astype(float) - b.astype(float)).mean() < tol


def test_jpeg_loads_as_grey_at_original_size(grey):
    image = load_image(REAL)
    assert image.mode == "L" and image.size == (224, 224)
    assert np.array_equal(np.asarray(image), grey)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "CMYK", "LA"])
def test_colour_modes_become_the_same_grey(tmp_path, grey, mode):
    image = Image.fromarray(grey).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    path = write(tmp_path, f"x.{fmt.lower()}", encode(image, fmt))
    assert _close(np.asarray(load_image(path)), grey, tol=3.0 if mode in ("P", "CMYK") else 0.01)


def test_16_bit_png_keeps_its_scale(tmp_path, grey):
    path = write(tmp_path, "x16.png", png16(grey))
    assert Image.open(path).mode.startswith("I")
    assert np.array_equal(np.asarray(load_image(path)), grey)


def test_exif_orientation_is_applied(tmp_path, grey):
    path = write(tmp_path, "rot.jpeg", exif_rotated(grey))
    loaded = np.asarray(load_image(path))
    assert _close(loaded, grey, tol=4.0)
    assert not _close(np.asarray(Image.open(path).convert("L")), grey, tol=4.0)  # stored pixels are rotated


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_monochrome_both_polarities(tmp_path, grey, photometric):
    path = write(tmp_path, "x.dcm", dicom(grey, photometric))
    assert np.corrcoef(np.asarray(load_image(path)).ravel(), grey.ravel())[0, 1] > 0.99


def test_dicom_rescale_and_window(tmp_path, grey):
    plain = np.asarray(load_image(write(tmp_path, "a.dcm", dicom(grey))))
    rescaled = np.asarray(load_image(write(tmp_path, "b.dcm", dicom(grey, rescale=(2.0, -1024.0)))))
    assert _close(plain, rescaled, tol=1.0)
    windowed = np.asarray(load_image(write(tmp_path, "c.dcm", dicom(grey, window=(1024, 1024)))))
    assert windowed.min() == 0 and windowed.max() == 255 and (windowed == 255).mean() > (plain == 255).mean()


def test_dicom_without_pixel_data(tmp_path, grey):
    with pytest.raises(ImageError, match="no pixel data"):
        load_image(write(tmp_path, "empty.dcm", dicom(grey, pixels=False)))


def test_dicom_transfer_syntax_without_handler(tmp_path, grey):
    import io

    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    ds = pydicom.dcmread(io.BytesIO(dicom(grey)))
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\0" * 64])  # not decodable JPEG 2000
    path = tmp_path / "j2k.dcm"
    ds.save_as(path)
    with pytest.raises(ImageError, match="cannot be decoded") as info:
        load_image(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.9])
def test_truncated_jpeg_is_refused(tmp_path, cut):
    data = REAL.read_bytes()
    path = write(tmp_path, "cut.jpeg", data[: int(len(data) * cut)])
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert str(info.value).startswith(str(path))


@pytest.mark.parametrize(
    "name,data,reason",
    [
        ("empty.jpeg", b"", "empty"),
        ("text.jpeg", b"this is not an image\n" * 20, "not a recognised image"),
        ("bomb.png", bomb_png(), "over the limit"),
    ],
)
def test_bad_files_give_one_line_reasons(tmp_path, name, data, reason):
    with pytest.raises(ImageError, match=reason) as info:
        load_image(write(tmp_path, name, data))
    assert "\n" not in str(info.value)


def test_jpeg_named_png_still_loads(tmp_path, grey):
    assert np.array_equal(np.asarray(load_image(write(tmp_path, "x.png", REAL.read_bytes()))), grey)


def test_tiny_image_and_size_limits(tmp_path):
    with pytest.raises(ImageError, match="1x1"):
        load_image(write(tmp_path, "one.png", encode(Image.new("L", (1, 1)), "PNG")))
    with pytest.raises(ImageError, match="MB limit"):
        load_image(REAL, max_bytes=1000)
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.jpeg")
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(tmp_path)


def test_arrays_pil_and_bytes_agree(grey):
    from_path = prepare(REAL, 128)
    assert np.array_equal(prepare(REAL.read_bytes(), 128), from_path)
    assert np.array_equal(prepare(Image.open(REAL), 128), from_path)
    assert np.array_equal(prepare(grey, 128), from_path)
    assert np.array_equal(prepare(grey.astype(np.float32) / 255, 128), from_path)
    with pytest.raises(ImageError, match="shape"):
        prepare(np.zeros((4, 4, 4, 4)), 128)


@pytest.mark.data
def test_draft_decoding_changes_little():
    """Reduced-scale JPEG decoding on full-resolution files: pixels close to a full decode."""
    from conftest import FULLRES

    from pneumoscan.io.images import Preprocessing

    for path in sorted((FULLRES / "NORMAL").iterdir())[:4]:
        full = Preprocessing(224).apply(load_image(path))
        drafted = prepare(path, 224)
        assert np.abs(full.astype(float) - drafted.astype(float)).mean() < 2.0


def test_unreadable_file(tmp_path, monkeypatch):
    """Permission bits do not stop root, so the refusal is simulated where the loader reads."""
    from pathlib import Path

    path = write(tmp_path, "locked.jpeg", REAL.read_bytes())

    real_open = os.open

    def refuse(file, *args, **kwargs):
        if Path(file) == path:
            raise PermissionError(13, "Permission denied")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(ImageError, match="locked.jpeg: permission denied"):
        load_image(path)
