"""``pneumoscan data prepare``: from the downloaded Kermany archive to the layout the commands expect.

The Kaggle download (``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/``, plus a ``__MACOSX`` tree and a
nested duplicate ``chest_xray/chest_xray/``) and the Mendeley ``ChestXRay2017.zip``
(``chest_xray/{train,test}/...``, no val) both become ``ROOT/{split}/{NORMAL,PNEUMONIA}/NAME``.

An archive is hostile until read: an entry's place is taken from the last three parts of its name
(split, class, file name) and its file name must be one plain name, so nothing can land outside ROOT;
links are refused; every entry is read with a bounded size; only JPEG, PNG and DICOM content is kept.
Every file is written atomically, so a run that is stopped and started again skips what is done.
"""

from __future__ import annotations

import io
import os
import stat
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .data import SPLITS
from .errors import ConfigError, ImageError
from .images import IMAGE_SUFFIXES, MAX_FILE_BYTES, UNSUPPORTED, prepare, read_bytes, sniff
from .labels import CLASSES
from .options import PrepareOptions
from .settings import DECLARED, declared

MAX_ENTRIES = 1_000_000  # an archive listing more entries than this is not the dataset
MAX_NAME_BYTES = 200
MARKER = ".pneumoscan-prepare.json"  # the size ROOT was prepared at
_CHUNK = 64  # images read ahead of the writers: bounds memory to about 64 files


@dataclass(frozen=True)
class Entry:
    """One image of the source: where it goes (split, class, file name) and how to read its bytes."""

    origin: str  # the entry's name in the archive or its path, for messages
    split: str
    label: str
    name: str
    read: Callable[[], bytes]


@dataclass
class PrepareReport:
    written: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> files written now
    already: int = 0  # files found in place from an earlier run
    duplicates: int = 0  # entries naming a file another entry already gives (the Kaggle zip's nested copy)
    errors: list[str] = field(default_factory=list)  # one line each: entry, reason

    def count(self, split: str, label: str) -> None:
        per_class = self.written.setdefault(split, dict.fromkeys(CLASSES, 0))
        per_class[label] += 1

    def lines(self) -> list[str]:
        out = [f"{'split':<8}{'NORMAL':>8}{'PNEUMONIA':>11}  (files written now)"]
        for split in sorted(self.written, key=SPLITS.index):
            c = self.written[split]
            out.append(f"{split:<8}{c['NORMAL']:>8}{c['PNEUMONIA']:>11}")
        out.append(f"already in place: {self.already}; duplicate entries skipped: {self.duplicates}")
        out.append(f"refused or unreadable: {len(self.errors)}")
        return out


def place(parts: tuple[str, ...]) -> tuple[str, str, str] | None:
    """(split, class, file name) for an entry whose name ends in SPLIT/CLASS/FILE, else None (other files,
    macOS metadata). Split and class are matched without regard to case."""
    if len(parts) < 3 or "__MACOSX" in parts:
        return None
    split, label, name = parts[-3].lower(), parts[-2].upper(), parts[-1]
    if split not in SPLITS or label not in CLASSES or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
        return None
    return split, label, name


def unsafe_name(name: str) -> str | None:
    """Why a file name cannot be written as one file inside ROOT, or None when it can."""
    if name in ("", ".", "..") or name.startswith("."):
        return "hidden or empty file name"
    if any(ch in name for ch in "/\\\0") or any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return "file name with a separator or control character"
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        return f"file name over {MAX_NAME_BYTES} bytes"
    return None


def _zip_entries(path: Path, archive: zipfile.ZipFile, max_bytes: int, report: PrepareReport) -> Iterator[Entry]:
    infos = archive.infolist()
    if len(infos) > MAX_ENTRIES:
        raise ConfigError(f"{path}: {len(infos)} entries, over the {MAX_ENTRIES} limit for this dataset")
    # shallowest first: of the Kaggle zip's two copies, the top one is taken
    for info in sorted(infos, key=lambda i: (i.filename.count("/"), i.filename)):
        if info.is_dir():
            continue
        where = place(PurePosixPath(info.filename.replace("\\", "/")).parts)
        if where is None:
            continue
        origin = f"{path}:{info.filename}"
        if stat.S_ISLNK(info.external_attr >> 16):
            report.errors.append(f"{origin}: a link, not a file (refused)")
        elif info.file_size > max_bytes:
            size, limit = _mb(info.file_size), _mb(max_bytes)
            report.errors.append(f"{origin}: {size} uncompressed, over the {limit} limit (refused)")
        else:
            yield Entry(origin, *where, read=lambda i=info, o=origin: _read_member(archive, i, o, max_bytes))


def _mb(n: int) -> str:
    return f"{n / 2**20:.{0 if n >= 10 * 2**20 else 2}f} MB"


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, origin: str, max_bytes: int) -> bytes:
    try:
        with archive.open(info) as stream:  # the size recorded in the header may lie: the read is bounded
            return read_bytes(stream, origin, max_bytes)
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError) as exc:
        raise ImageError(origin, f"cannot be read from the archive ({exc})") from None


def _folder_entries(root: Path, max_bytes: int, report: PrepareReport) -> Iterator[Entry]:
    found = []
    for folder, dirs, files in os.walk(root):  # links to folders are not followed
        dirs[:] = [d for d in dirs if d != "__MACOSX"]
        for name in files:
            path = Path(folder) / name
            where = place(path.relative_to(root).parts)
            if where is None:
                continue
            if path.is_symlink():
                report.errors.append(f"{path}: a link, not a file (refused)")
                continue
            found.append((len(path.relative_to(root).parts), str(path), where))
    for _depth, path, where in sorted(found):
        yield Entry(path, *where, read=lambda p=path: read_bytes(p, p, max_bytes))


def _entries(source: Path, max_bytes: int, report: PrepareReport, stack: ExitStack) -> Iterator[Entry]:
    if source.is_dir():
        return _folder_entries(source, max_bytes, report)
    if source.is_file():
        try:
            archive = stack.enter_context(zipfile.ZipFile(source))
        except (zipfile.BadZipFile, OSError) as exc:
            raise ConfigError(f"{source}: not a readable zip archive ({exc})") from None
        return _zip_entries(source, archive, max_bytes, report)
    raise ConfigError(f"{source}: not found (expected the downloaded zip or its unpacked folder)")


def _target(out: Path, entry: Entry, size: int | None) -> Path:
    name = entry.name if size is None else str(Path(entry.name).with_suffix(".jpeg"))
    return out / entry.split / entry.label / name


def _convert(data: bytes, entry: Entry, size: int | None) -> bytes:
    """What is written for an entry: its bytes (image content checked), or a resized grey JPEG made by
    the project's one image loader (aspect ratio squashed, as the shared 224 px set)."""
    if size is None:
        if sniff(data, entry.name) is None:
            raise ImageError(entry.origin, UNSUPPORTED, "unsupported")
        return data
    from PIL import Image

    source = io.BytesIO(data)
    source.name = entry.origin
    buffer = io.BytesIO()
    Image.fromarray(prepare(source, size)).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:50]}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)  # a link planted at the target is replaced, never followed
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_earlier_run(out: Path, size: int | None) -> None:
    """A folder is prepared at one size: files of another size already there would be kept as done."""
    import json

    marker = out / MARKER
    if marker.is_file():
        try:
            earlier = json.loads(marker.read_text(encoding="utf-8"))["size"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(
                f"{marker}: not written by pneumoscan data prepare; remove it or use another --out"
            ) from None
        if earlier != size or isinstance(earlier, bool):
            was = "original files" if earlier is None else f"--size {earlier}"
            raise ConfigError(f"{out}: prepared earlier with {was}; use another --out for this size")
    else:
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(marker, json.dumps({"size": size}).encode())


def _done(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


@declared(PrepareOptions, "source", "out", "size", "progress")
def prepare_dataset(
    source: str | Path,
    out: str | Path,
    size: int | None = DECLARED,
    progress: bool = DECLARED,
    max_bytes: int = MAX_FILE_BYTES,
) -> PrepareReport:
    """Lay the Kermany download (zip or folder) ``source`` out as ``out/{split}/{NORMAL,PNEUMONIA}/``;
    with ``size``, as ``size`` x ``size`` grey JPEGs. Files already in place are skipped; entries that
    are links, too large, badly named or not images are listed in the report, and the rest written."""
    source, out = Path(source), Path(out)
    if source.is_dir() and (out.resolve() == source.resolve() or source.resolve() in out.resolve().parents):
        raise ConfigError(f"{out}: the output folder must lie outside the source folder {source}")
    _check_earlier_run(out, size)
    report = PrepareReport()
    with ExitStack() as stack:  # the archive stays open while its entries are written
        entries = _entries(source, max_bytes, report, stack)
        return _write_all(entries, source, out, size, progress, report)


def _write_all(
    entries: Iterator[Entry], source: Path, out: Path, size: int | None, progress: bool, report: PrepareReport
) -> PrepareReport:
    from tqdm import tqdm

    targets: set[Path] = set()
    todo: list[tuple[Entry, Path]] = []
    for entry in entries:
        if reason := unsafe_name(entry.name):
            report.errors.append(f"{entry.origin}: {reason} (refused)")
            continue
        target = _target(out, entry, size)
        if target in targets:
            report.duplicates += 1
        elif _done(target):
            targets.add(target)
            report.already += 1
        else:
            targets.add(target)
            todo.append((entry, target))
    if not targets:
        raise ConfigError(f"{source}: no images in a {{train,val,test}}/{{NORMAL,PNEUMONIA}} layout found")

    def one(job: tuple[Entry, Path]) -> str | None:
        entry, target = job
        try:
            data = _convert(entry.read(), entry, size)
        except ImageError as exc:
            return str(exc)
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(target, data)
        return None

    with tqdm(total=len(todo), desc="preparing", unit="img", disable=not progress) as bar:
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            for start in range(0, len(todo), _CHUNK):
                chunk = todo[start : start + _CHUNK]
                for (entry, _target_path), error in zip(chunk, pool.map(one, chunk)):
                    if error:
                        report.errors.append(error)
                    else:
                        report.count(entry.split, entry.label)
                    bar.update()
    return report
