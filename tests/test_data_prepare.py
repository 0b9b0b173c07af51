"""`pneumoscan data prepare` on small archives made here from the 16 real example images."""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import FULLRES, real_images
from corpus import dicom
from PIL import Image

from pneumoscan.cli.main import main
from pneumoscan.core.errors import ConfigError
from pneumoscan.io.dataset import check_dataset, load_split
from pneumoscan.io.images import load_image, prepare
from pneumoscan.io.prepare import MAX_ARCHIVE_RATIO, MAX_ENTRY_RATIO, place, prepare_dataset, unsafe_name

EXAMPLES = Path(__file__).resolve().parents[1] / "src" / "pneumoscan" / "examples"


def _examples(label: str) -> list[Path]:
    return sorted((EXAMPLES / label).glob("*.jpeg"))


def _layout() -> dict[str, Path]:
    """Archive name -> real image: the 16 examples spread over train (4+4), val (2+2) and test (2+2)."""
    files = {}
    for label in ("NORMAL", "PNEUMONIA"):
        images = _examples(label)
        for split, chosen in (("train", images[:4]), ("val", images[4:6]), ("test", images[6:8])):
            for f in chosen:
                files[f"{split}/{label}/{f.name}"] = f
    return files


def kaggle_zip(path: Path) -> Path:
    """The Kaggle download's shape: chest_xray/..., a nested duplicate chest_xray/chest_xray/..., and
    macOS metadata under __MACOSX."""
    with zipfile.ZipFile(path, "w") as z:
        for name, f in _layout().items():
            z.write(f, f"chest_xray/{name}")
            z.write(f, f"chest_xray/chest_xray/{name}")
            z.writestr(f"__MACOSX/chest_xray/{Path(name).parent}/._{f.name}", b"\x00\x05\x16\x07 apple double")
        z.writestr("chest_xray/train/NORMAL/.DS_Store", b"Bud1")
    return path


def test_kaggle_zip_becomes_the_layout_data_check_accepts(tmp_path):
    root = tmp_path / "chest_xray"
    report = prepare_dataset(kaggle_zip(tmp_path / "archive.zip"), root, progress=False)
    assert report.errors == []
    assert report.written == {s: {"NORMAL": n, "PNEUMONIA": n} for s, n in (("test", 2), ("train", 4), ("val", 2))}
    assert report.duplicates == 16  # the nested copy
    check = check_dataset(root, progress=False)
    assert check.counts == {"train": {"NORMAL": 4, "PNEUMONIA": 4}, "val": {"NORMAL": 2, "PNEUMONIA": 2},
                            "test": {"NORMAL": 2, "PNEUMONIA": 2}}  # fmt: skip
    assert check.unreadable == []
    for name, original in _layout().items():  # the original bytes, not a re-encoding
        assert (root / name).read_bytes() == original.read_bytes()
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["test", "train", "val"]  # no __MACOSX or nesting


def test_running_again_skips_what_is_done_and_finishes_what_is_not(tmp_path):
    archive, root = kaggle_zip(tmp_path / "archive.zip"), tmp_path / "out"
    prepare_dataset(archive, root, progress=False)
    missing = root / "test" / "PNEUMONIA" / _examples("PNEUMONIA")[7].name
    missing.unlink()  # as if the first run had been stopped before this file
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.jpeg")}
    again = prepare_dataset(archive, root, progress=False)
    assert again.already == 15 and sum(sum(c.values()) for c in again.written.values()) == 1
    assert missing.is_file()
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # nothing rewritten
    with pytest.raises(ConfigError, match="prepared earlier with original files; use another --out"):
        prepare_dataset(archive, root, size=64, progress=False)


def test_mendeley_zip_without_val_and_an_unpacked_folder(tmp_path):
    archive = tmp_path / "ChestXRay2017.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name, f in _layout().items():
            if not name.startswith("val/"):
                z.write(f, f"chest_xray/{name.replace('NORMAL', 'normal')}")  # class case does not matter
    root = tmp_path / "from-zip"
    prepare_dataset(archive, root, progress=False)
    assert check_dataset(root, progress=False).counts == {
        "train": {"NORMAL": 4, "PNEUMONIA": 4},
        "test": {"NORMAL": 2, "PNEUMONIA": 2},
    }
    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(archive).extractall(unpacked)
    from_folder = tmp_path / "from-folder"
    prepare_dataset(unpacked, from_folder, progress=False)
    assert sorted(p.relative_to(from_folder) for p in from_folder.rglob("*.jpeg")) == sorted(
        p.relative_to(root) for p in root.rglob("*.jpeg")
    )
    with pytest.raises(ConfigError, match="outside the source folder"):
        prepare_dataset(unpacked, unpacked / "out", progress=False)


def test_resized_copy_is_what_the_loader_makes(tmp_path):
    root = tmp_path / "small"
    prepare_dataset(kaggle_zip(tmp_path / "archive.zip"), root, size=64, progress=False)
    samples = load_split(root, "train")
    assert len(samples) == 8
    original = _examples("NORMAL")[0]
    resized = np.asarray(load_image(root / "train" / "NORMAL" / original.name))
    assert resized.shape == (64, 64)
    from pneumoscan.io.images import prepare

    assert np.abs(resized.astype(int) - prepare(original, 64).astype(int)).mean() < 2  # JPEG q95 of the same


def test_hostile_archive_entries_are_refused_and_nothing_escapes(tmp_path):
    good = _examples("NORMAL")[0]
    archive = tmp_path / "hostile.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(good, "chest_xray/train/NORMAL/good.jpeg")
        z.write(good, "../../train/PNEUMONIA/climbs.jpeg")  # lands inside ROOT by construction
        z.write(good, "chest_xray/train/NORMAL/a\\..\\..\\..\\evil.jpeg")  # Windows separators: not a place
        link = zipfile.ZipInfo("chest_xray/train/NORMAL/link.jpeg")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(link, "/etc/passwd")
        z.writestr("chest_xray/train/PNEUMONIA/text.jpeg", b"this is not an image")
        z.writestr("chest_xray/test/NORMAL/big.jpeg", good.read_bytes() + b"\0" * 1_200_000)
    root = tmp_path / "root"
    report = prepare_dataset(archive, root, progress=False, max_bytes=1_000_000)
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == [
        "hostile.zip",
        "root/.pneumoscan-prepare.json",
        "root/train/NORMAL/good.jpeg",
        "root/train/PNEUMONIA/climbs.jpeg",
    ]
    reasons = "\n".join(report.errors)
    assert "link.jpeg: a link" in reasons
    assert "text.jpeg: not a recognised image" in reasons
    assert re.search(r"big.jpeg: [\d.]+ MB uncompressed, over the 0.95 MB limit", reasons)
    assert len(report.errors) == 3


def test_places_and_names():
    assert place(("chest_xray", "TRAIN", "pneumonia", "x.jpeg")) == ("train", "PNEUMONIA", "x.jpeg")
    assert place(("__MACOSX", "chest_xray", "train", "NORMAL", "._x.jpeg")) is None
    assert place(("chest_xray", "train", "NORMAL", "notes.txt")) is None
    assert place(("train", "OTHER", "x.jpeg")) is None
    assert unsafe_name("x.jpeg") is None
    for bad in ("..", ".hidden.jpeg", "a\nb.jpeg", "x" * 300 + ".jpeg"):
        assert unsafe_name(bad)


def test_cli_prepare_exit_codes(tmp_path, capsys):
    archive = kaggle_zip(tmp_path / "archive.zip")
    assert main(["data", "prepare", str(archive), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "pneumoscan data check" in out
    assert main(["data", "prepare", str(tmp_path / "missing.zip"), "--out", str(tmp_path / "b"), "--quiet"]) == 2
    assert "missing.zip: not found" in capsys.readouterr().err
    (tmp_path / "empty.zip").write_bytes(b"PK\x05\x06" + b"\0" * 18)  # a valid, empty zip
    assert main(["data", "prepare", str(tmp_path / "empty.zip"), "--out", str(tmp_path / "c"), "--quiet"]) == 2
    assert "no images" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # refused whole: no folder, no marker
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    assert main(["data", "prepare", str(tmp_path / "junk.zip"), "--out", str(tmp_path / "d"), "--quiet"]) == 2
    assert "not a readable zip" in capsys.readouterr().err
    with zipfile.ZipFile(tmp_path / "part.zip", "w") as z:
        z.write(_examples("NORMAL")[0], "chest_xray/train/NORMAL/a.jpeg")
        z.writestr("chest_xray/train/NORMAL/b.jpeg", b"junk")
    assert main(["data", "prepare", str(tmp_path / "part.zip"), "--out", str(tmp_path / "e"), "--quiet"]) == 1
    assert (tmp_path / "e" / "train" / "NORMAL" / "a.jpeg").is_file()


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _deflated(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


@pytest.mark.data
def test_a_deflated_zip_of_real_films_is_far_inside_the_ratio_limits(tmp_path):
    """The limits against the measure: the 48 full-resolution films, deflated as the downloads are."""
    films = sorted(FULLRES.rglob("*.jpeg"))
    archive = _deflated(
        tmp_path / "films.zip", {f"chest_xray/train/{f.parent.name}/{f.name}": f.read_bytes() for f in films}
    )
    infos = zipfile.ZipFile(archive).infolist()
    ratios = [i.file_size / i.compress_size for i in infos]
    overall = sum(i.file_size for i in infos) / sum(i.compress_size for i in infos)
    assert max(ratios) < 1.2 and overall < 1.1  # measured: at most 1.08 per film, 1.01 overall
    assert MAX_ENTRY_RATIO >= 50 * max(ratios) and MAX_ARCHIVE_RATIO >= 5 * overall
    report = prepare_dataset(archive, tmp_path / "out", progress=False)
    assert report.errors == [] and report.written == {"train": {"NORMAL": 24, "PNEUMONIA": 24}}


@pytest.mark.data
def test_zip_bombs_and_misnamed_content_are_refused(tmp_path):
    """Zero-filled .dcm entries, each under the size cap, once unpacked 2 GB from a 2 MB zip: each entry's
    compression ratio is bounded, and every entry must decode as what its name says."""
    film, other = real_images("train", "NORMAL", 2)
    grey = np.asarray(Image.open(film).convert("L"))
    png = io.BytesIO()
    Image.open(other).save(png, "PNG")
    members = {f"chest_xray/train/NORMAL/zeros{i}.dcm": bytes(4_000_000) for i in range(3)}  # about 1000:1 each
    members |= {
        "chest_xray/train/NORMAL/film.jpeg": film.read_bytes(),
        "chest_xray/train/NORMAL/film.dcm": dicom(grey),  # a real DICOM of a real film: kept
        "chest_xray/train/NORMAL/noise.dcm": os.urandom(200_000),  # incompressible, and no DICOM
        "chest_xray/train/NORMAL/jpeg-inside.dcm": film.read_bytes(),
        "chest_xray/train/NORMAL/png-inside.jpeg": png.getvalue(),
        "chest_xray/train/NORMAL/truncated.jpeg": film.read_bytes()[: film.stat().st_size // 2],
    }
    report = prepare_dataset(_deflated(tmp_path / "bomb.zip", members), tmp_path / "out", progress=False)
    assert _files(tmp_path / "out") == [".pneumoscan-prepare.json", "train/NORMAL/film.dcm", "train/NORMAL/film.jpeg"]
    reasons = "\n".join(report.errors)
    for i in range(3):
        assert re.search(rf"zeros{i}.dcm: unpacks to \d+ times its compressed size, over the 100:1 limit", reasons)
    assert "noise.dcm: DICOM file has no pixel data" in reasons
    assert "jpeg-inside.dcm: named .dcm but holds a JPEG image" in reasons
    assert "png-inside.jpeg: named .jpeg but holds a PNG image" in reasons
    assert "truncated.jpeg: image data are truncated" in reasons
    assert len(report.errors) == 7


@pytest.mark.data
def test_an_archive_over_the_total_or_too_compressed_is_refused_whole_leaving_nothing(tmp_path, capsys):
    films = real_images("train", "PNEUMONIA", 4)
    # each film padded with zeros to about 50:1, under the entry limit: the archive as a whole is the bomb
    padded = {f"chest_xray/train/PNEUMONIA/{f.name}": f.read_bytes() + bytes(400_000) for f in films}
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"padded.zip: its images unpack to \d+ times their compressed size, over"):
        prepare_dataset(_deflated(tmp_path / "padded.zip", padded), out, progress=False)
    assert not out.exists()
    full = sorted(FULLRES.rglob("*.jpeg"))[:6]  # 3.7 MB of real films, declared honestly
    archive = _deflated(tmp_path / "full.zip", {f"train/{f.parent.name}/{f.name}": f.read_bytes() for f in full})
    with pytest.raises(
        ConfigError, match=r"full.zip: its images unpack to 0.0037 GB, over the --max-total-gb 0.001 limit"
    ):
        prepare_dataset(archive, out, max_total_gb=0.001, progress=False)
    assert not out.exists()
    args = ["data", "prepare", str(archive), "--out", str(out), "--quiet"]
    assert main([*args, "--max-total-gb", "0.001"]) == 2
    assert "over the --max-total-gb 0.001 limit (refused, nothing written)" in capsys.readouterr().err
    assert not out.exists()
    assert main([*args, "--max-total-gb", "0"]) == 2
    assert "--max-total-gb must be > 0" in capsys.readouterr().err
    assert main(args) == 0 and len(_files(out)) == 7  # the default: 8 GB


@pytest.mark.data
def test_the_total_is_counted_as_files_are_written_and_a_refusal_takes_them_back(tmp_path):
    """224 px films made 1024 px JPEGs write far more than they unpack: only counting what is written as it
    goes finds that, part-way through; what was written before is taken back."""
    films = real_images("train", "NORMAL", 4)  # 28 KB unpacked, about 350 KB written at 1024 px
    archive = _deflated(tmp_path / "small.zip", {f"train/NORMAL/{f.name}": f.read_bytes() for f in films})
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"small.zip: the files written come to more than the --max-total-gb 0.0002"):
        prepare_dataset(archive, out, size=1024, max_total_gb=0.0002, progress=False)
    assert not out.exists()
    earlier = tmp_path / "earlier"  # a folder prepared before keeps what it had
    prepare_dataset(archive, earlier, size=1024, progress=False)
    (earlier / "train" / "NORMAL" / films[0].name).unlink()
    before = _files(earlier)
    report = prepare_dataset(archive, earlier, size=1024, max_total_gb=0.0002, progress=False)
    assert report.written == {"train": {"NORMAL": 1, "PNEUMONIA": 0}}  # 94 KB more is inside the bound
    assert _files(earlier) == sorted([*before, f"train/NORMAL/{films[0].name}"])


def _lying_sizes(path: Path, name: str, size: int) -> None:
    """Make the central directory (and local header) say ``name`` unpacks to ``size`` bytes."""
    data = bytearray(path.read_bytes())
    raw = name.encode()
    for signature, at in ((b"PK\x01\x02", 24), (b"PK\x03\x04", 22)):
        offset = 46 if signature == b"PK\x01\x02" else 30
        start = data.index(signature + b"", 0)
        while data[start + offset : start + offset + len(raw)] != raw:
            start = data.index(signature, start + 4)
        data[start + at : start + at + 4] = size.to_bytes(4, "little")
    path.write_bytes(bytes(data))


@pytest.mark.data
def test_a_header_understating_an_entry_unpacks_no_more_than_it_says(tmp_path):
    film = real_images("test", "NORMAL", 1)[0]
    archive = _deflated(
        tmp_path / "lies.zip", {"test/NORMAL/a.jpeg": film.read_bytes(), "test/NORMAL/big.jpeg": bytes(50_000_000)}
    )
    _lying_sizes(archive, "test/NORMAL/big.jpeg", 5_000)  # 50 MB of zeros, declared as 5 KB (10:1)
    report = prepare_dataset(archive, tmp_path / "out", max_total_gb=0.001, progress=False)
    assert _files(tmp_path / "out") == [".pneumoscan-prepare.json", "test/NORMAL/a.jpeg"]
    assert len(report.errors) == 1 and "big.jpeg: cannot be read from the archive (Bad CRC-32" in report.errors[0]


def _encoded(path: Path, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.open(path).save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.data
def test_different_images_of_one_name_both_survive_and_copies_are_duplicates(tmp_path, capsys):
    a, b, c, d, e = real_images("train", "PNEUMONIA", 5)
    members = {
        "chest_xray/train/PNEUMONIA/a.jpeg": a.read_bytes(),
        "chest_xray/train/PNEUMONIA/a.png": _encoded(b, "PNG"),  # a.jpeg too with --size
        "chest_xray/train/PNEUMONIA/c.JPEG": c.read_bytes(),
        "chest_xray/train/PNEUMONIA/c.jpeg": d.read_bytes(),  # c.jpeg too with --size, and on a case-blind disk
        "chest_xray/chest_xray/train/PNEUMONIA/a.jpeg": a.read_bytes(),  # a true copy
        "chest_xray/chest_xray/train/PNEUMONIA/e.jpeg": e.read_bytes(),
        "elsewhere/train/PNEUMONIA/e.jpeg": a.read_bytes(),  # the same name, another image
    }
    archive = _deflated(tmp_path / "names.zip", members)

    def digest(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()[:12]

    root = tmp_path / "small"
    report = prepare_dataset(archive, root, size=64, progress=False)
    made = {
        "a.jpeg": a,
        f"a~{digest(members['chest_xray/train/PNEUMONIA/a.png'])}.jpeg": b,
        "c.jpeg": c,
        f"c~{digest(d.read_bytes())}.jpeg": d,
        "e.jpeg": a,  # shallowest first: elsewhere/ is taken before chest_xray/chest_xray/
        f"e~{digest(e.read_bytes())}.jpeg": e,
    }
    assert _files(root) == sorted([".pneumoscan-prepare.json", *(f"train/PNEUMONIA/{n}" for n in made)])
    for name, source in made.items():  # each file is its own image
        written = np.asarray(load_image(root / "train" / "PNEUMONIA" / name)).astype(int)
        assert np.abs(written - prepare(source, 64).astype(int)).mean() < 2
    assert report.duplicates == 1 and report.errors == [] and report.written["train"]["PNEUMONIA"] == 6
    assert len(report.renamed) == 3
    assert any(line.endswith(f"a.png: written as a~{digest(members['chest_xray/train/PNEUMONIA/a.png'])}.jpeg, "
                             "train/PNEUMONIA/a.jpeg being a different image") for line in report.renamed)  # fmt: skip
    again = prepare_dataset(archive, root, size=64, progress=False)  # a second run finds them all in place
    assert again.already == 6 and again.duplicates == 1 and again.written == {} and again.renamed == []

    originals = tmp_path / "originals"
    assert main(["data", "prepare", str(archive), "--out", str(originals), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "written under another name, a different image having the same one: 2" in out
    assert f"c.jpeg: written as c~{digest(d.read_bytes())}.jpeg, train/PNEUMONIA/c.JPEG being a different image" in out
    kept = originals / "train" / "PNEUMONIA"
    assert (kept / "c.JPEG").read_bytes() == c.read_bytes()
    assert (kept / f"c~{digest(d.read_bytes())}.jpeg").read_bytes() == d.read_bytes()
    assert (kept / "a.png").read_bytes() == members["chest_xray/train/PNEUMONIA/a.png"]


def _with_raw_name(path: Path, name: str, raw: bytes) -> None:
    """Put ``raw`` (the same length as ``name`` in UTF-8) in place of the name, keeping the UTF-8 flag."""
    data = path.read_bytes()
    assert len(raw) == len(name.encode()) and data.count(name.encode()) == 2  # local header, central directory
    path.write_bytes(data.replace(name.encode(), raw))


@pytest.mark.data
def test_an_entry_whose_name_is_not_utf8_is_named_and_skipped(tmp_path, capsys):
    good, bad = real_images("val", "NORMAL", 2)
    archive = _deflated(
        tmp_path / "names.zip",
        {"chest_xray/val/NORMAL/good.jpeg": good.read_bytes(), "chest_xray/val/NORMAL/café.jpeg": bad.read_bytes()},
    )
    _with_raw_name(archive, "chest_xray/val/NORMAL/café.jpeg", b"chest_xray/val/NORMAL/caf\xff\xfe.jpeg")
    report = prepare_dataset(archive, tmp_path / "out", progress=False)
    assert _files(tmp_path / "out") == [".pneumoscan-prepare.json", "val/NORMAL/good.jpeg"]
    shown = "chest_xray/val/NORMAL/caf\\xff\\xfe.jpeg"  # the raw bytes, escaped
    assert report.errors == [f"{archive}:{shown}: name is not UTF-8, though the archive says it is (skipped)"]
    assert main(["data", "prepare", str(archive), "--out", str(tmp_path / "cli"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "caf\\xff\\xfe.jpeg: name is not UTF-8" in err
    only_bad = tmp_path / "only-bad.zip"  # nothing left to write: refused whole, nothing left behind
    _deflated(only_bad, {"chest_xray/val/NORMAL/café.jpeg": bad.read_bytes()})
    _with_raw_name(only_bad, "chest_xray/val/NORMAL/café.jpeg", b"chest_xray/val/NORMAL/caf\xff\xfe.jpeg")
    assert main(["data", "prepare", str(only_bad), "--out", str(tmp_path / "none"), "--quiet"]) == 2
    assert "no images" in capsys.readouterr().err and not (tmp_path / "none").exists()


@pytest.mark.data
def test_a_new_name_never_takes_the_file_of_an_entry_named_so(tmp_path):
    a, b, f = real_images("test", "PNEUMONIA", 3)
    digest = hashlib.sha256(a.read_bytes()).hexdigest()
    members = {
        "test/PNEUMONIA/x.JPEG": b.read_bytes(),  # taken first (sorted by name), x.jpeg with --size
        "test/PNEUMONIA/x.jpeg": a.read_bytes(),  # would become x~<12 hex>.jpeg ...
        f"test/PNEUMONIA/x~{digest[:12]}.jpeg": f.read_bytes(),  # ... the name of another image
    }
    root = tmp_path / "out"
    report = prepare_dataset(_deflated(tmp_path / "planted.zip", members), root, size=64, progress=False)
    kept = root / "test" / "PNEUMONIA"
    assert _files(kept) == sorted(["x.jpeg", f"x~{digest[:12]}.jpeg", f"x~{digest}.jpeg"])
    for name, source in (("x.jpeg", b), (f"x~{digest[:12]}.jpeg", f), (f"x~{digest}.jpeg", a)):
        written = np.asarray(load_image(kept / name)).astype(int)
        assert np.abs(written - prepare(source, 64).astype(int)).mean() < 2
    assert report.errors == [] and len(report.renamed) == 1
