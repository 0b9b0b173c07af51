"""Hostile inputs: run folders, bundles, file names and files made by someone else.

Each test names the class of problem it guards; each fails on the code before the hardening."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from corpus import REAL, bomb_png, dicom, encode, real_grey, write
from PIL import Image

from pneumoscan import Classifier
from pneumoscan.core.errors import ConfigError, ImageError
from pneumoscan.io.images import load_image
from pneumoscan.model.store import load_bundle

CLI = [sys.executable, "-m", "pneumoscan.cli"]


def _cli(*args, **kw):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, timeout=300, **kw)


def _one_line(done) -> str:
    err = done.stderr.decode("utf-8", "replace") if isinstance(done.stderr, bytes) else done.stderr
    assert "Traceback" not in err, err[-2000:]
    return err


# --- 1. run folders: resume never unpickles -----------------------------------------------------------------


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PWNED']}",))


def test_resume_refuses_a_planted_checkpoint(small_data, tmp_path):
    import torch

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    config = {"data": str(small_data), "out": str(run), "epochs": 1, "limit": 8}
    (run / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "pwned"
    os.environ["PWNED"] = str(marker)
    torch.save({"state_dict": {}, "epoch": 0, "evil": _Payload()}, run / "checkpoints" / "head-last.ckpt")
    done = _cli("train", "--resume", run, "--quiet")
    err = _one_line(done)
    assert done.returncode == 2 and "head-last.ckpt: refused as a checkpoint" in err, err
    assert not marker.exists()


def test_resume_state_cannot_point_outside_the_run(small_data, tmp_path):
    from pneumoscan.training.trainer import RunState

    run = tmp_path / "run"
    run.mkdir()
    (run / "state.json").write_text(json.dumps({"done": {"head": [0.9, "/etc/passwd"]}, "seconds": {}}))
    score, checkpoint = RunState(run, resume=True).finished("head")
    assert checkpoint == run / "checkpoints" / "passwd"


@pytest.mark.parametrize(
    "config,fragment",
    [
        ("{broken", "not valid JSON"),
        ('{"data": "x", "out": "y", "epochs": "many"}', "--epochs must be int"),
        ('{"data": "x", "out": "y", "dropout": 7}', "--dropout must be"),
        ('{"data": "x", "out": "y", "augmentation": {"rotation": -400}}', "--rotation must be"),
        ('{"data": "x", "out": "y", "augmentation": {"evil": 1}}', "augmentation"),
        ("[1, 2]", "must hold a JSON object"),
    ],
)
def test_resume_with_a_broken_config_is_one_line(tmp_path, config, fragment):
    (tmp_path / "config.json").write_text(config)
    done = _cli("train", "--resume", tmp_path)
    err = _one_line(done)
    assert done.returncode == 2 and fragment in err and len(err.strip().splitlines()) == 1, err


# --- 2. bundles: strings are text, files are verified, values are checked at load ----------------------------


@pytest.fixture
def hostile_bundle(exported_bundle, tmp_path):
    """A copy of a real bundle whose strings carry markup, as a hostile author would write them."""
    from pneumoscan.model.bundle import write_bundle
    from pneumoscan.model.schema import WEIGHTS

    copy = shutil.copytree(exported_bundle.path, tmp_path / "model")
    bundle = load_bundle(copy)
    config = {
        **bundle.config,
        "name": '<img src=x onerror="document.title=1">',
        "notes": "<script>alert(1)</script> [click](javascript:alert(1))",
        "threshold_rule": "<b>youden</b>",
    }
    return write_bundle(copy, config, bundle.metrics, weights=copy / WEIGHTS)


def test_bundle_strings_stay_text_in_the_model_card(hostile_bundle):
    card = (hostile_bundle.path / "MODEL_CARD.md").read_text()
    assert "<script>" not in card and "<img" not in card and "<b>" not in card
    assert "&lt;script&gt;" in card and "\\[click\\]" in card


def test_swapped_onnx_is_refused(exported_bundle, tmp_path):
    copy = shutil.copytree(exported_bundle.path, tmp_path / "model")
    shutil.copyfile(copy / "model.int8.onnx", copy / "model.onnx")
    with pytest.raises(ConfigError, match="model.onnx: sha256 does not match"):
        load_bundle(copy)
    done = _cli("predict", REAL, "--model", copy)
    assert done.returncode == 2 and "sha256 does not match" in _one_line(done)


def test_onnx_from_other_weights_is_refused_even_with_a_matching_sha(exported_bundle, trained_bundle, tmp_path):
    """An ONNX model must carry the bundle's weights digest in its metadata, whatever config.json says."""
    from pneumoscan.model.backbones import sha256_file

    copy = shutil.copytree(exported_bundle.path, tmp_path / "model")
    other = tmp_path / "other.onnx"
    import onnx

    model = onnx.load(str(copy / "model.onnx"))
    for prop in model.metadata_props:
        if prop.key == "pneumoscan_weights_sha256":
            prop.value = "0" * 64
    onnx.save(model, str(other))
    shutil.copyfile(other, copy / "model.onnx")
    config = json.loads((copy / "config.json").read_text())
    config["files"]["model.onnx"] = sha256_file(copy / "model.onnx")
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="not exported from this bundle's weights"):
        Classifier.load(copy, engine="onnx")


def test_a_poisoned_cache_entry_is_exported_again(trained_bundle):
    from pneumoscan.inference.engines import onnx_cache_path

    Classifier.load(trained_bundle.path)  # fills the cache
    path = onnx_cache_path(trained_bundle)
    path.write_bytes(b"not an onnx model")
    clf = Classifier.load(trained_bundle.path)
    assert clf.engine.name == "onnx" and clf.predict_one(REAL).ok


def _edit(path: Path, name: str, edit) -> None:
    target = path / name
    data = json.loads(target.read_text())
    target.write_text(edit(data) if callable(edit) else edit)


@pytest.mark.parametrize(
    "name,edit,fragment",
    [
        ("config.json", lambda c: json.dumps({**c, "dropout": 5}), "dropout 5"),
        ("config.json", lambda c: json.dumps({**c, "temperature": 1e300}), "temperature"),
        ("config.json", lambda c: json.dumps(c).replace('"temperature": ', '"temperature": Infinity, "x": '), "JSON"),
        ("config.json", lambda c: json.dumps({**c, "notes": [[[[[[[[]]]]]]]]}), "'notes' has the wrong type"),
        ("config.json", lambda c: json.dumps(c)[:-1] + ', "deep": ' + "[" * 5000 + "]" * 5000 + "}", "nested"),
        ("config.json", lambda c: json.dumps({**c, "calibration": {"source": 1}}), "calibration.source"),
        ("config.json", lambda c: json.dumps({**c, "files": {"../../etc/passwd": "0" * 64}}), "'files'"),
        ("config.json", lambda c: json.dumps({**c, "backbone": "vgg"}), "unknown backbone"),
        ("metrics.json", lambda m: "[1, 2, 3]", "metrics.json must hold a JSON object"),
        ("metrics.json", lambda m: json.dumps({"validation": {"auc": "high"}}), "validation.auc"),
        ("metrics.json", lambda m: json.dumps({"validation": {"ci95": {"auc": "wide"}}}), "ci95"),
    ],
)
def test_bundle_values_that_would_fail_later_are_refused_at_load(trained_bundle, tmp_path, name, edit, fragment):
    copy = shutil.copytree(trained_bundle.path, tmp_path / "model")
    _edit(copy, name, edit)
    with pytest.raises(ConfigError, match=fragment):
        load_bundle(copy)
    done = _cli("predict", REAL, "--model", copy, "--format", "jsonl")
    err = _one_line(done)
    assert done.returncode == 2 and len(err.strip().splitlines()) == 1, err


def test_onnx_with_the_wrong_contract_is_refused(exported_bundle, tmp_path):
    """Input of another type, an output of another name: refused when the engine is built, not on first use."""
    import onnx
    from onnx import TensorProto, helper

    from pneumoscan.model.backbones import sha256_file
    from pneumoscan.model.bundle import onnx_metadata

    copy = shutil.copytree(exported_bundle.path, tmp_path / "model")
    size = exported_bundle.image_size
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["image"], ["score"], keepdims=0)],
        "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, size, size])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for key, value in onnx_metadata(exported_bundle.config).items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(copy / "model.onnx"))
    config = json.loads((copy / "config.json").read_text())
    config["files"]["model.onnx"] = sha256_file(copy / "model.onnx")
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="uint8 input"):
        Classifier.load(copy, engine="onnx")


# --- 3 and 4. names: CSV cells never start formulas, terminals never get control characters ------------------


@pytest.fixture
def hostile_names(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    names = ["=HYPERLINK(evil).jpeg", "+1.jpeg", "@sum.jpeg", "-2.jpeg", "a\nPNEUMONIA     0.9999  forged.jpeg"]
    names.append("\x1b[2J\x1b]0;owned\x07.jpeg")
    for name in names:
        shutil.copyfile(REAL, folder / name)
    return folder, names


def test_csv_cells_never_start_a_formula(hostile_names, trained_bundle):
    import csv

    folder, names = hostile_names
    done = _cli("predict", folder, "--model", trained_bundle.path, "--format", "csv")
    assert done.returncode == 0
    rows = list(csv.DictReader(io.StringIO(done.stdout.decode())))
    assert len(rows) == len(names)
    for row in rows:
        for cell in row.values():
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), cell
    jsonl = _cli("predict", folder, "--model", trained_bundle.path, "--format", "jsonl")
    paths = {Path(json.loads(line)["path"]).name for line in jsonl.stdout.decode().splitlines()}
    assert paths == set(names)  # JSON lines keep the names exact


def test_evaluation_predictions_csv_is_safe_too(trained_bundle, tmp_path):
    import csv

    from pneumoscan.evaluation.evaluate import evaluate

    root = tmp_path / "data"
    for label, source in (("NORMAL", "IM-0001-0001.jpeg"), ("PNEUMONIA", "person1_virus_6.jpeg")):
        (root / label).mkdir(parents=True)
        shutil.copyfile(REAL, root / label / f"=cmd{label}$x^2$.jpeg")  # formula and matplotlib math
        shutil.copyfile(REAL, root / label / source)
    evaluate(root, None, [str(trained_bundle.path)], tmp_path / "eval", engine="torch", n_resamples=20, progress=False)
    rows = list(csv.reader(open(tmp_path / "eval" / "predictions.csv")))
    assert all(not cell.startswith(("=", "+", "-", "@")) for row in rows for cell in row)
    assert (tmp_path / "eval" / "report.html").is_file() and (tmp_path / "eval" / "random_predictions.png").is_file()


def test_table_and_errors_escape_control_characters(hostile_names, trained_bundle, tmp_path):
    folder, names = hostile_names
    (folder / "bad\r\x1b[1A.jpeg").write_bytes(b"broken")
    done = _cli("predict", folder, "--model", trained_bundle.path)
    out, err = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 1
    assert "\x1b" not in out + err and "\r" not in out + err and "\x07" not in out + err
    assert len(out.strip().splitlines()) == len(names) + 1 + 2  # header, one line per input, summary
    assert err.strip() == "" and "\\x1b" in out  # the table holds the error line, escaped; stderr repeats nothing


def test_names_that_are_not_utf8_print(trained_bundle, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    name = os.fsdecode(b"caf\xe9-\xff.jpeg")
    shutil.copyfile(REAL, folder / name)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    for fmt in ("table", "csv", "jsonl"):
        done = _cli("predict", folder, "--model", trained_bundle.path, "--format", fmt, env=env)
        assert done.returncode == 0, done.stderr
        assert b"\\xe9" in done.stdout or b"\\udce9" in done.stdout


# --- 5. only the promised formats -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "WEBP", "BMP", "PPM", "TGA", "ICO", "EPS", "PCX", "IM"])
def test_only_jpeg_png_and_dicom_are_decoded(tmp_path, fmt):
    image = Image.fromarray(real_grey()[:128, :128])
    try:
        data = encode(image, fmt)
    except (OSError, KeyError):  # a format this Pillow cannot write: its header is enough to sniff
        data = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n" if fmt == "EPS" else b"\x00" * 256
    for name in ("x.jpeg", "x.png", "x.tif"):
        with pytest.raises(ImageError, match="not a recognised image") as caught:
            load_image(write(tmp_path, name, data))
        assert caught.value.kind == "unsupported"


def test_a_jpeg_named_dcm_is_read_by_content(tmp_path):
    expected = np.asarray(load_image(REAL))
    assert np.array_equal(np.asarray(load_image(write(tmp_path, "x.dcm", REAL.read_bytes()))), expected)


# --- 6. DICOM decompression bombs -------------------------------------------------------------------------


def _deflated_dicom(pixel_bytes: int) -> bytes:
    """A deflate-compressed DICOM whose pixel data inflate to ``pixel_bytes``, built without holding them."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    write_file_meta_info(head, meta, enforce_standard=True)

    def element(group, elem, vr, value: bytes) -> bytes:
        return group.to_bytes(2, "little") + elem.to_bytes(2, "little") + vr + len(value).to_bytes(2, "little") + value

    side = int((pixel_bytes // 2) ** 0.5)
    body = element(0x0028, 0x0010, b"US", side.to_bytes(2, "little")) + element(
        0x0028, 0x0011, b"US", side.to_bytes(2, "little")
    )
    body += b"\xe0\x7f\x10\x00OW\x00\x00" + (pixel_bytes).to_bytes(4, "little")
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [deflate.compress(body)]
    chunk = b"\0" * (1 << 20)
    for _ in range(pixel_bytes >> 20):
        parts.append(deflate.compress(chunk))
    parts.append(deflate.flush())
    return b"\0" * 128 + b"DICM" + head.getvalue() + b"".join(parts)


def test_deflated_dicom_bomb_is_refused_before_inflating(tmp_path):
    import resource

    data = _deflated_dicom(1 << 30)  # 1 GB of pixels in about 1 MB
    assert len(data) < 2 * 2**20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageError, match="inflate past") as caught:
        load_image(write(tmp_path, "bomb.dcm", data))
    assert caught.value.kind == "too_large"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 300 * 1024  # KB


def test_multiframe_dicom_is_bounded_by_all_its_frames(tmp_path):
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(dicom(real_grey())))
    ds.NumberOfFrames = 5000  # 5000 x 224 x 224 x 2 bytes = 500 MB if decoded
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(ImageError, match="5000 frame") as caught:
        load_image(write(tmp_path, "frames.dcm", buf.getvalue()))
    assert caught.value.kind == "too_large"


def test_a_small_multiframe_dicom_uses_its_first_frame(tmp_path):
    from pydicom import dcmread

    grey = real_grey()
    ds = dcmread(io.BytesIO(dicom(grey)))
    second = np.flipud(grey)
    values = np.concatenate([grey, second]).astype(np.uint16) * 16
    ds.NumberOfFrames = 2
    ds.PixelData = values.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf)
    first = np.asarray(load_image(write(tmp_path, "two.dcm", buf.getvalue())), dtype=float)
    assert np.corrcoef(first.ravel(), grey.ravel())[0, 1] > 0.99


def _jpeg_ls_frame(width: int, height: int, bits: int = 16) -> bytes:
    """A JPEG-LS codestream head (SOF55, one component) claiming ``width`` x ``height``, with a scrap of data."""
    import struct

    sof = b"\xff\xf7" + struct.pack(">HBHHB", 11, bits, height, width, 1) + b"\x01\x11\x00"
    sos = b"\xff\xda" + struct.pack(">HB", 8, 1) + b"\x01\x00\x00\x00\x00"
    return b"\xff\xd8" + sof + sos + b"\x00" * 64 + b"\xff\xd9"


def _rle_bomb(megabytes: int) -> bytes:
    """One DICOM RLE segment of runs: every 2 bytes unpack to 128."""
    return (1).to_bytes(4, "little") + (64).to_bytes(4, "little") + b"\0" * 56 + b"\x81\x00" * (megabytes << 19)


@pytest.mark.parametrize(
    "codec,size",
    [("jpeg", (12000, 12000)), ("jpeg-progressive", (9000, 9000)), ("j2k", (9000, 9000)), ("jpeg-ls", (8000, 8000))],
)
def test_compressed_dicom_frames_are_bounded_by_their_own_header(tmp_path, codec, size):
    """The DICOM header says 64x64; the frame's own header (SOF, SOF55, SIZ) says more: refused before decoding."""
    import resource

    from corpus import encapsulated_dicom, with_frame_size

    small = Image.fromarray(real_grey())
    if codec == "jpeg-ls":
        frame, syntax = _jpeg_ls_frame(*size), "1.2.840.10008.1.2.4.80"
    elif codec == "j2k":
        frame, syntax = with_frame_size(encode(small, "JPEG2000", irreversible=False), *size), "1.2.840.10008.1.2.4.90"
    else:
        frame = with_frame_size(encode(small, "JPEG", progressive=codec.endswith("progressive")), *size)
        syntax = "1.2.840.10008.1.2.4.51" if codec.endswith("progressive") else "1.2.840.10008.1.2.4.50"
    data = encapsulated_dicom(frame, syntax, 64, 64)
    assert len(data) < 100_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageError, match=f"{size[0]}x{size[1]}"):
        load_image(write(tmp_path, "frame.dcm", data))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50 * 1024  # KB: nothing decoded


def test_an_rle_frame_that_unpacks_past_its_header_is_refused(tmp_path):
    from corpus import encapsulated_dicom

    data = encapsulated_dicom(_rle_bomb(2), "1.2.840.10008.1.2.5", 64, 64)  # 2 MB that unpack to 128 MB
    with pytest.raises(ImageError, match="RLE frame unpacks to more than the 64x64") as caught:
        load_image(write(tmp_path, "rle.dcm", data))
    assert caught.value.kind == "too_large"


@pytest.mark.parametrize("codec", ["jpeg", "jpeg-progressive", "j2k", "rle"])
def test_compressed_dicom_frames_that_match_their_header_decode(tmp_path, codec):
    from corpus import encapsulated_dicom
    from pydicom import dcmread

    grey = real_grey()
    if codec == "rle":
        ds = dcmread(io.BytesIO(dicom(grey)))
        ds.compress("1.2.840.10008.1.2.5")
        buf = io.BytesIO()
        ds.save_as(buf)
        data = buf.getvalue()
    elif codec == "j2k":
        frame = encode(Image.fromarray(grey), "JPEG2000", irreversible=False)
        data = encapsulated_dicom(frame, "1.2.840.10008.1.2.4.90", *grey.shape)
    else:
        frame = encode(Image.fromarray(grey), "JPEG", quality=95, progressive=codec.endswith("progressive"))
        data = encapsulated_dicom(frame, "1.2.840.10008.1.2.4.50", *grey.shape)
    image = np.asarray(load_image(write(tmp_path, "ok.dcm", data)), dtype=float)
    assert image.shape == grey.shape and np.corrcoef(image.ravel(), grey.ravel())[0, 1] > 0.99


@pytest.mark.parametrize("subsampling,side", [(0, 9000), (2, 10000)])  # 486 MB and 300 MB of coefficients
def test_progressive_colour_jpeg_counts_its_coefficient_buffer(tmp_path, subsampling, side):
    """libjpeg keeps every DCT coefficient of a progressive file (2 bytes each, all components, full size
    whatever the draft scale): that buffer is in the decode bound, checked before decoding."""
    import resource

    from corpus import with_frame_size

    small = Image.fromarray(real_grey()).convert("RGB")
    data = with_frame_size(encode(small, "JPEG", progressive=True, subsampling=subsampling), side, side)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageError, match="progressive JPEG coefficients") as caught:
        load_image(write(tmp_path, "p.jpeg", data), draft_size=224)
    assert caught.value.kind == "too_large"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50 * 1024  # KB
    baseline = with_frame_size(encode(small, "JPEG", subsampling=subsampling), side, side)
    try:  # the same picture as baseline JPEG is decoded at 1/8 scale, a row at a time: within the bound
        load_image(write(tmp_path, "b.jpeg", baseline), draft_size=224)
    except ImageError as exc:
        assert exc.kind != "too_large", exc


def test_progressive_and_colour_jpegs_of_radiograph_size_still_load(tmp_path):
    grey = real_grey()
    big = Image.fromarray(grey).resize((2000, 2000))
    for image in (big, big.convert("RGB")):
        data = encode(image, "JPEG", quality=95, progressive=True)
        loaded = np.asarray(load_image(write(tmp_path, "p.jpeg", data), draft_size=224).resize((224, 224)), float)
        assert np.corrcoef(loaded.ravel(), grey.ravel())[0, 1] > 0.98


# --- 8. special files and in-memory images ------------------------------------------------------------------


def test_data_check_refuses_special_files(tmp_path):
    root = tmp_path / "set"
    for label in ("NORMAL", "PNEUMONIA"):
        (root / label).mkdir(parents=True)
        shutil.copyfile(REAL, root / label / "good.jpeg")
    os.symlink("/dev/zero", root / "NORMAL" / "zero.jpeg")
    os.mkfifo(root / "PNEUMONIA" / "fifo.jpeg")
    start = time.time()
    done = _cli("data", "check", root, "--quiet")
    assert time.time() - start < 60
    out = done.stdout.decode()
    assert done.returncode == 1 and out.count("not a regular file") == 2, out


def test_the_api_checks_pil_images_and_arrays_like_files(trained_bundle):
    clf = Classifier.load(trained_bundle.path)
    bomb = Image.open(io.BytesIO(bomb_png(12000, 12000)))  # lazily opened: 144 MP claimed by its header
    results = clf.predict([Image.new("L", (1, 1)), bomb, np.zeros((1, 1)), np.full((64, 64), np.nan), REAL])
    assert [r.ok for r in results] == [False, False, False, False, True]
    assert "1x1" in results[0].error and "over the limit" in results[1].error and "NaN" in results[3].error


# --- 11. one line, never a traceback ------------------------------------------------------------------------


def test_output_paths_that_cannot_be_written(trained_bundle, small_data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for args in (
        ["evaluate", "--data", small_data, "--split", "test", "--model", trained_bundle.path, "--out", blocker],
        ["calibrate", "--data", small_data, "--split", "test", "--model", trained_bundle.path, "--out", blocker],
        ["export", "--model", trained_bundle.path, "--out", blocker / "x.onnx"],
        ["demo", "--out", blocker],
        ["predict", REAL, "--model", trained_bundle.path, "--cam", blocker],
    ):
        done = _cli(*args, "--quiet") if args[0] in ("evaluate", "calibrate") else _cli(*args)
        err = _one_line(done)
        assert done.returncode == 2 and len(err.strip().splitlines()) == 1 and str(blocker) in err, (args, err)


def test_long_names_with_cam_and_empty_paths(trained_bundle, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    long_name = "x" * 250 + ".jpeg"
    shutil.copyfile(REAL, folder / long_name)
    done = _cli("predict", folder, "--model", trained_bundle.path, "--cam", tmp_path / "cams")
    assert done.returncode == 0, _one_line(done)
    assert len(list((tmp_path / "cams").iterdir())) == 1
    done = _cli("predict", "", REAL, "--model", trained_bundle.path, "--format", "jsonl")
    rows = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert done.returncode == 1 and rows[0] == {"path": "", "error": "empty path"} and "probability" in rows[1]


def _deep_tree(tmp_path):
    """A folder 1,100 levels deep with a real X-ray at the bottom: (its top, every level)."""
    deep = tmp_path / "deep"
    levels = [deep]
    for _ in range(1100):  # one level at a time: os.makedirs (and shutil.rmtree) recurse
        levels.append(levels[-1] / "d")
    for level in levels:
        level.mkdir()
    shutil.copyfile(REAL, levels[-1] / "x.jpeg")
    return deep, levels


def test_deeply_nested_folders(trained_bundle, tmp_path):
    deep, levels = _deep_tree(tmp_path)
    try:
        done = _cli("predict", deep, "--model", trained_bundle.path, "--format", "jsonl")
        err = _one_line(done)
        assert done.returncode == 0 and json.loads(done.stdout)["label"] in ("NORMAL", "PNEUMONIA"), err
    finally:
        (levels[-1] / "x.jpeg").unlink()
        for level in reversed(levels):
            level.rmdir()


def test_a_class_folder_of_unreadable_images(trained_bundle, tmp_path):
    root = tmp_path / "data"
    (root / "NORMAL").mkdir(parents=True)
    (root / "PNEUMONIA").mkdir()
    shutil.copyfile(REAL, root / "PNEUMONIA" / "person1_virus_6.jpeg")
    (root / "NORMAL" / "IM-0001-0001.jpeg").write_bytes(b"broken")
    done = _cli("evaluate", "--data", root, "--model", trained_bundle.path, "--out", tmp_path / "e", "--quiet")
    _one_line(done)
    assert done.returncode == 1 and (tmp_path / "e" / "metrics.json").is_file()


def test_serve_on_a_busy_port_is_one_line(trained_bundle):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        done = _cli("serve", "--model", trained_bundle.path, "--port", port)
    err = _one_line(done)
    assert done.returncode == 2 and f"127.0.0.1:{port}: cannot listen" in err and len(err.strip().splitlines()) == 1


# --- 12. bundle files are regular files inside the bundle, bounded; the served card is generated --------------


@pytest.mark.parametrize("name", ["MODEL_CARD.md", "metrics.json", "model.safetensors", "model.int8.onnx"])
def test_bundle_files_that_are_links_are_refused(exported_bundle, tmp_path, name):
    """A link may point at a private file (or /dev/zero); even a link to the right bytes is refused."""
    copy = shutil.copytree(exported_bundle.path, tmp_path / "model")
    outside = tmp_path / "outside"
    (copy / name).rename(outside)
    os.symlink(outside, copy / name)
    with pytest.raises(ConfigError, match=f"{name}: is a symbolic link"):
        load_bundle(copy)
    done = _cli("predict", REAL, "--model", copy)
    err = _one_line(done)
    assert done.returncode == 2 and "symbolic link" in err and len(err.strip().splitlines()) == 1, err


def test_bundle_files_that_are_folders_or_too_large_are_refused(trained_bundle, tmp_path):
    copy = shutil.copytree(trained_bundle.path, tmp_path / "model")
    (copy / "MODEL_CARD.md").write_bytes(b"x" * (3 * 2**20))
    with pytest.raises(ConfigError, match="MODEL_CARD.md: 3.0 MB, over the 1 MB limit"):
        load_bundle(copy)
    (copy / "MODEL_CARD.md").unlink()
    (copy / "MODEL_CARD.md").mkdir()
    with pytest.raises(ConfigError, match="MODEL_CARD.md: not a regular file"):
        load_bundle(copy)


def test_the_served_model_card_is_generated_not_read(trained_bundle, tmp_path):
    """A card swapped for a link to a private file after the service started is never sent."""
    from fastapi.testclient import TestClient

    from pneumoscan.serving.service import create_app

    copy = shutil.copytree(trained_bundle.path, tmp_path / "model")
    secret = tmp_path / "secret.txt"
    secret.write_text("root:SECRET-HASH:19000:0:99999:7:::\n")
    client = TestClient(create_app(classifier=Classifier.load(copy, engine="torch")))
    (copy / "MODEL_CARD.md").unlink()
    os.symlink(secret, copy / "MODEL_CARD.md")
    body = client.get("/v1/model").json()
    assert "SECRET-HASH" not in json.dumps(body)
    assert body["model_card"].startswith("#") and len(body["model_card"]) < 2**20


# --- 13. predict --output --resume: only files pneumoscan wrote, with the same settings, one writer ----------


def _predict(model, *args, cwd=None):
    return subprocess.run(
        [*CLI, "predict", "--model", str(model), *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd
    )


@pytest.mark.parametrize(
    "name,content", [("theirs.csv", b"id,score\n1,0.5\n2,0.7"), ("theirs.jsonl", b'{"a": 1}\n{"b"')]
)
def test_resume_never_changes_a_file_pneumoscan_did_not_write(trained_bundle, tmp_path, name, content):
    out = tmp_path / name
    out.write_bytes(content)  # another program's file, its last line without a newline
    done = _predict(trained_bundle.path, REAL, "--output", out, "--resume")
    assert done.returncode == 2 and "not a results file written by pneumoscan" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and out.read_bytes() == content


def test_resume_refuses_another_model_threshold_engine_or_gate(trained_bundle, tmp_path):
    out = tmp_path / "r.jsonl"
    first = _predict(trained_bundle.path, REAL, "--output", out, "--engine", "torch")
    assert first.returncode == 0, first.stderr
    before = out.read_bytes()
    head = json.loads((tmp_path / "r.jsonl.pneumoscan.json").read_text())
    assert head["weights_sha256"] == trained_bundle.config["weights_sha256"] and head["gate"] == "on"
    other = shutil.copytree(trained_bundle.path, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    config["threshold"] = 0.3
    (other / "config.json").write_text(json.dumps(config))
    for model, extra, word in (
        (trained_bundle.path, ["--engine", "torch", "--no-gate"], "gate"),
        (other, ["--engine", "torch"], "threshold"),
        (trained_bundle.path, ["--engine", "auto"], "engine"),  # ONNX Runtime on the cached export
    ):
        done = _predict(model, REAL, "--output", out, "--resume", *extra)
        assert done.returncode == 2 and word in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert out.read_bytes() == before


def test_resume_matches_inputs_by_resolved_path_and_csv_names_never_collide(trained_bundle, tmp_path):
    """'=a.jpeg' and ''=a.jpeg' were one cell after formula escaping; an absolute spelling of a file done
    under a relative one was done again."""
    import csv

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("=a.jpeg", "'=a.jpeg", "b.jpeg"):
        shutil.copyfile(REAL, folder / name)
    first = _predict(trained_bundle.path, "=a.jpeg", "--output", "r.csv", cwd=folder)
    assert first.returncode == 0, first.stderr
    again = _predict(trained_bundle.path, folder / "." / "=a.jpeg", ".", "--output", "r.csv", "--resume", cwd=folder)
    assert again.returncode == 0 and "2 classified" in again.stdout, again.stdout + again.stderr
    with open(folder / "r.csv", newline="") as f:
        paths = [row["path"] for row in csv.DictReader(f)]
    assert sorted(paths) == sorted(["'=a.jpeg", "''=a.jpeg", "b.jpeg"]), paths  # each once, escaped apart


def _settings(**changes) -> dict:
    from pneumoscan.inference.output import RESULTS_FORMAT

    base = {"format": RESULTS_FORMAT, "model": "m", "weights_sha256": "0" * 64, "engine": "onnx"}
    return {**base, "threshold": 0.5, "temperature": 1.0, "gate": "on", "cwd": "/", **changes}


def test_a_second_writer_of_a_results_file_is_refused(tmp_path):
    from pneumoscan.inference.output import ResultsFile

    first = ResultsFile(tmp_path / "r.jsonl", _settings(), ["/x.jpeg"])
    try:
        with pytest.raises(ConfigError, match="another pneumoscan is writing this file"):
            ResultsFile(tmp_path / "r.jsonl", _settings(), ["/x.jpeg"], resume=True)
    finally:
        first.close()
    again = ResultsFile(tmp_path / "r.jsonl", _settings(), ["/x.jpeg"], resume=True)  # the lock went with it
    again.close()


def test_resume_reads_the_file_a_line_at_a_time(tmp_path):
    """Memory follows this run's inputs, not the size of the file being resumed."""
    import tracemalloc

    from pneumoscan.inference.output import ResultsFile

    path = tmp_path / "big.jsonl"
    row = {"path": "", "error": "x" * 200}
    (tmp_path / "big.jsonl.pneumoscan.json").write_text(json.dumps(_settings()))
    with open(path, "w") as f:
        for i in range(200_000):
            f.write(json.dumps({**row, "path": f"/data/{i:07d}.jpeg"}) + "\n")
    assert path.stat().st_size > 40 * 2**20
    tracemalloc.start()
    results = ResultsFile(path, _settings(), ["/data/0000007.jpeg", "/data/new.jpeg"], resume=True)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    results.close()
    assert results.done == [True, False] and peak < 4 * 2**20, peak


@pytest.mark.parametrize(
    "name,body,fragment",
    [
        ("deep.jsonl", "[" * 200_000 + "\n", "line 2 is not a result written by pneumoscan (nested too deeply)"),
        ("wide.csv", "'" + "x" * 300_000 + ",1\n", "line 3 is not a result written by pneumoscan (field larger"),
        ("long.jsonl", '{"path": "' + "x" * (2**20 + 10) + '"}\n', "a line is over 1024 KB"),
    ],
)
def test_malformed_results_files_are_one_line(trained_bundle, tmp_path, name, body, fragment):
    path = tmp_path / name
    assert _predict(trained_bundle.path, REAL, "--output", path).returncode == 0
    with open(path, "a", newline="") as f:
        f.write(body)
    before = path.read_bytes()
    done = _predict(trained_bundle.path, REAL, "--output", path, "--resume")
    assert done.returncode == 2 and fragment in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert path.read_bytes() == before


# --- 14. deep trees and empty paths ------------------------------------------------------------------------


def test_a_recursive_glob_over_a_deep_tree(trained_bundle, tmp_path):
    deep, levels = _deep_tree(tmp_path)
    shutil.copyfile(REAL, deep / "top.jpeg")
    try:
        done = _cli("predict", f"{deep}/**/*.jpeg", "--model", trained_bundle.path, "--format", "jsonl")
        err = _one_line(done)
        rows = [json.loads(line) for line in done.stdout.decode().splitlines()]
        assert done.returncode == 0 and len(rows) == 2 and all("label" in r for r in rows), err
    finally:
        for f in (levels[-1] / "x.jpeg", deep / "top.jpeg"):
            f.unlink()
        for level in reversed(levels):
            level.rmdir()


def test_glob_files_agrees_with_glob_on_a_small_tree(tmp_path, monkeypatch):
    import glob

    from pneumoscan.inference.inputs import glob_files

    for name in ("a/b/x.jpeg", "a/.hidden/y.jpeg", "c/z.png", "top.jpeg", "a/b/c/d/w.dcm"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REAL, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    for pattern in ("**/*.jpeg", "*/*/*", "a/**", "./a/**/w.dcm", f"{tmp_path}/**/*.png", "?/*.png", "**/**/*.jpeg"):
        matches = glob.glob(pattern, recursive=True)  # files and folders; a last ** stands for the files below
        expected = sorted({Path(p) for p in matches if not (pattern.endswith("**") and os.path.isdir(p))})
        assert glob_files(pattern) == expected, pattern


def test_a_glob_reports_what_the_folder_given_directly_reports(tmp_path, monkeypatch):
    """FIFOs, looping links and folders that cannot be listed are failed inputs, named with the reason, whether
    the folder or a pattern names them; the real films still get their answers (a FIFO is never opened)."""
    scans = tmp_path / "scans"
    (scans / "ok").mkdir(parents=True)
    shutil.copyfile(REAL, scans / "film.jpeg")
    shutil.copyfile(REAL, scans / "ok" / "inner.jpeg")
    os.mkfifo(scans / "pipe.jpeg")
    os.symlink("loop.jpeg", scans / "loop.jpeg")  # a link to itself
    os.symlink("tangle", scans / "tangle")  # a folder link to itself: it cannot be listed
    monkeypatch.chdir(tmp_path)

    def outcome(*args):
        done = _cli("predict", *args, "--no-gate", "--format", "jsonl", cwd=tmp_path)
        rows = {json.loads(line)["path"]: json.loads(line) for line in done.stdout.decode().splitlines()}
        return done.returncode, {Path(p).name: ("label" in r, r.get("error", "")) for p, r in rows.items()}

    code, direct = outcome("scans")
    assert code == 1 and direct["film.jpeg"][0] and direct["inner.jpeg"][0], direct
    assert not direct["pipe.jpeg"][0] and not direct["loop.jpeg"][0]
    for pattern in ("scans/*", f"{scans}/*", "scans/**/*.jpeg"):
        code, globbed = outcome(pattern)
        assert code == 1 and globbed["film.jpeg"][0] and globbed["inner.jpeg"][0], (pattern, globbed)
        assert {"pipe.jpeg", "loop.jpeg"} <= set(globbed) and not globbed["pipe.jpeg"][0], (pattern, globbed)
    _, direct_errors = outcome("scans")
    _, glob_errors = outcome("scans/*")
    failed = lambda rows: {k: v for k, v in rows.items() if not v[0]}  # noqa: E731
    assert failed(direct_errors).items() <= failed(glob_errors).items()  # a pattern also names what it matched


@pytest.mark.parametrize(
    "args",
    [
        ["evaluate", "--data", ""],
        ["evaluate", "--data", ".", "--out", ""],
        ["data", "check", ""],
        ["calibrate", "--data", ".", "--out", ""],
        ["train", "--data", ".", "--out", ""],
        ["predict", "x.jpeg", "--output", ""],
        ["predict", "x.jpeg", "--model", ""],
        ["export", "--out", ""],
        ["demo", "--out", ""],
        ["evaluate", "--data", ".", "--ledger", ""],
    ],
)
def test_an_empty_path_is_a_usage_error(tmp_path, args):
    done = _cli(*args, cwd=tmp_path)
    err = _one_line(done)
    assert done.returncode == 2 and "empty path" in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []  # the current folder was not taken for it


def test_the_api_refuses_an_empty_path_too(trained_bundle, tmp_path):
    from pneumoscan.evaluation.evaluate import evaluate
    from pneumoscan.io.dataset import check_dataset
    from pneumoscan.training.calibrate import calibrate_bundle

    for call in (
        lambda: check_dataset(""),
        lambda: evaluate("", "test", [str(trained_bundle.path)], tmp_path / "x", progress=False),
        lambda: evaluate(".", "test", [str(trained_bundle.path)], "", progress=False),
        lambda: calibrate_bundle(".", "", model=str(trained_bundle.path), progress=False),
        lambda: load_bundle(""),
    ):
        with pytest.raises(ConfigError, match="empty path"):
            call()


# --- 15. the test-read ledger ------------------------------------------------------------------------------


@pytest.fixture
def tiny_split(tmp_path):
    from conftest import real_images

    root = tmp_path / "tiny"
    for label in ("NORMAL", "PNEUMONIA"):
        (root / label).mkdir(parents=True)
        for f in real_images("test", label, 4):
            os.symlink(f, root / label / f.name)
    return root


def test_the_ledger_records_the_code_that_ran_not_the_current_folder(trained_bundle, tiny_split, tmp_path):
    import csv

    from pneumoscan.evaluation.evaluate import code_version

    other = tmp_path / "other-repo"  # the user runs pneumoscan from inside another repository
    other.mkdir()
    git = ["git", "-C", str(other), "-c", "user.email=a@b", "-c", "user.name=a"]
    subprocess.run(["git", "init", "-q", str(other)], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    theirs = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    args = ["evaluate", "--data", tiny_split, "--model", trained_bundle.path, "--out", tmp_path / "e"]
    done = _cli(*args, "--ledger", "ledger.csv", "--bootstrap", 20, "--quiet", cwd=other)
    assert done.returncode == 0, _one_line(done)
    rows = list(csv.DictReader(open(other / "ledger.csv")))
    assert len(rows) == 1 and rows[0]["commit"] == code_version() and not rows[0]["commit"].startswith(theirs)


@pytest.mark.parametrize("kind", ["unwritable", "other header"])
def test_a_ledger_that_cannot_take_the_row_stops_the_run_before_it(trained_bundle, tiny_split, tmp_path, kind):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    ledger = blocker / "ledger.csv" if kind == "unwritable" else tmp_path / "scores.csv"
    if kind == "other header":
        ledger.write_text("name,score\nmine,0.9\n")
    before = ledger.read_bytes() if ledger.is_file() else None
    out = tmp_path / "e"
    done = _cli("evaluate", "--data", tiny_split, "--model", trained_bundle.path, "--out", out, "--ledger", ledger)
    err = _one_line(done)
    assert done.returncode == 2 and len(err.strip().splitlines()) == 1 and str(ledger) in err, err
    assert not out.exists()  # refused before any work
    assert (ledger.read_bytes() if ledger.is_file() else None) == before
