"""`pneumoscan data prepare` on small archives made here from the 16 real example images."""

from __future__ import annotations

import re
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pneumoscan.cli import main
from pneumoscan.data import check_dataset, load_split
from pneumoscan.data_prepare import place, prepare_dataset, unsafe_name
from pneumoscan.errors import ConfigError
from pneumoscan.images import load_image

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
    from pneumoscan.images import prepare

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
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    assert main(["data", "prepare", str(tmp_path / "junk.zip"), "--out", str(tmp_path / "d"), "--quiet"]) == 2
    assert "not a readable zip" in capsys.readouterr().err
    with zipfile.ZipFile(tmp_path / "part.zip", "w") as z:
        z.write(_examples("NORMAL")[0], "chest_xray/train/NORMAL/a.jpeg")
        z.writestr("chest_xray/train/NORMAL/b.jpeg", b"junk")
    assert main(["data", "prepare", str(tmp_path / "part.zip"), "--out", str(tmp_path / "e"), "--quiet"]) == 1
    assert (tmp_path / "e" / "train" / "NORMAL" / "a.jpeg").is_file()
