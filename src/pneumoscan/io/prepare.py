"""``pneumoscan data prepare``: from the downloaded Kermany archive to the layout the commands expect.

The Kaggle download (``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/``, plus a ``__MACOSX`` tree and a
nested duplicate ``chest_xray/chest_xray/``) and the Mendeley ``ChestXRay2017.zip``
(``chest_xray/{train,test}/...``, no val) both become ``ROOT/{split}/{NORMAL,PNEUMONIA}/NAME``.

An archive is hostile until read: an entry's place is taken from the last three parts of its name
(split, class, file name) and its file name must be one plain name, so nothing can land outside ROOT;
links are refused; every entry is read with a bounded size and a bounded compression ratio, and the whole
archive with a bounded total and ratio (the sizes its entries declare are checked before anything is written,
and the bytes counted as they are read and written, since a header can lie); an entry is kept only when the
project's one image loader decodes it as the format its name says. Two different images that would become one
file both stay (the later one as ``stem~HASH.ext``); byte-identical copies are duplicates. An entry whose name
is not the UTF-8 the archive claims is listed and skipped. An archive refused whole leaves nothing behind.
Every file is written atomically, so a run that is stopped and started again skips what is done.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import stat
import tempfile
import threading
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from pneumoscan.core.errors import ConfigError, ImageError
from pneumoscan.core.labels import CLASSES
from pneumoscan.core.options import PrepareOptions
from pneumoscan.core.settings import DECLARED, declared
from pneumoscan.io.dataset import SPLITS
from pneumoscan.io.images import (
    IMAGE_SUFFIXES,
    MAX_FILE_BYTES,
    SUFFIX_FORMATS,
    UNSUPPORTED,
    load_image,
    prepare,
    read_bytes,
    sniff,
)

MAX_ENTRIES = 1_000_000  # an archive listing more entries than this is not the dataset
MAX_NAME_BYTES = 200
MARKER = ".pneumoscan-prepare.json"  # the size ROOT was prepared at
_CHUNK = 64  # images read ahead of the writers: bounds memory to about 64 files
MAX_ENTRY_RATIO = 100  # an entry unpacking to more than 100x its compressed size is no film (real ones: 1.0-1.1)
MAX_ARCHIVE_RATIO = 10  # nor is an archive of images that does (real films deflated together: 1.01-1.03)
GB = 2**30
_UTF8_FLAG = 0x800  # zip general purpose flag: the entry's name is UTF-8
_CENTRAL_HEADER = b"PK\x01\x02"


@dataclass(frozen=True)
class Entry:
    """One image of the source: where it goes (split, class, file name) and how to read its bytes."""

    origin: str  # the entry's name in the archive or its path, for messages
    split: str
    label: str
    name: str
    size: int  # the bytes it declares: its zip header's uncompressed size, or the file's size when listed
    packed: int | None  # the bytes it takes in the archive; None for a folder's files
    read: Callable[[], bytes]


@dataclass
class Job:
    """The entries that would become one file (``target``), in the order they are taken."""

    target: Path
    entries: list[Entry]


@dataclass
class PrepareReport:
    written: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> files written now
    already: int = 0  # files found in place from an earlier run
    duplicates: int = 0  # entries byte-identical to one another entry gives the same file (the Kaggle nested copy)
    renamed: list[str] = field(default_factory=list)  # one line each: a different image of a name already taken
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
        out.append(f"written under another name, a different image having the same one: {len(self.renamed)}")
        out.extend(f"  {line}" for line in self.renamed)
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


class _ArchiveFile(io.FileIO):
    """The zip file as :mod:`zipfile` reads it, but for one thing while its listing is read: an entry whose name
    is flagged UTF-8 and is not loses the flag, so that zipfile lists it (as cp437) instead of refusing the whole
    archive. Its raw name is kept in ``undecodable``; the entry is skipped."""

    def __init__(self, path: Path):
        super().__init__(path, "rb")
        self.listing = True
        self.undecodable: set[bytes] = set()

    def read(self, size: int = -1) -> bytes:
        data = super().read(size)
        if self.listing and data.startswith(_CENTRAL_HEADER):  # zipfile reads the central directory in one go
            data = self._unflag_false_utf8(data)
        return data

    def _unflag_false_utf8(self, data: bytes) -> bytes:
        out, pos = bytearray(data), 0
        while data.startswith(_CENTRAL_HEADER, pos) and pos + 46 <= len(data):
            flags = int.from_bytes(data[pos + 8 : pos + 10], "little")
            name_length, extra, comment = (int.from_bytes(data[pos + i : pos + i + 2], "little") for i in (28, 30, 32))
            name = data[pos + 46 : pos + 46 + name_length]
            if flags & _UTF8_FLAG and not _is_utf8(name):
                out[pos + 8 : pos + 10] = (flags & ~_UTF8_FLAG).to_bytes(2, "little")
                self.undecodable.add(name)
            pos += 46 + name_length + extra + comment
        return bytes(out)


def _is_utf8(name: bytes) -> bool:
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _undecodable_name(info: zipfile.ZipInfo, undecodable: set[bytes]) -> bytes | None:
    """The raw name of an entry that :class:`_ArchiveFile` took the false UTF-8 flag from, else None."""
    if not undecodable or info.flag_bits & _UTF8_FLAG:
        return None
    raw = info.orig_filename.encode("cp437")  # what zipfile decoded the name from
    return raw if raw in undecodable else None


def _zip_entries(
    path: Path, archive: zipfile.ZipFile, undecodable: set[bytes], max_bytes: int, report: PrepareReport
) -> Iterator[Entry]:
    infos = archive.infolist()
    if len(infos) > MAX_ENTRIES:
        raise ConfigError(f"{path}: {len(infos)} entries, over the {MAX_ENTRIES} limit for this dataset")
    # shallowest first: of the Kaggle zip's two copies, the top one is taken
    for info in sorted(infos, key=lambda i: (i.filename.count("/"), i.filename)):
        if info.is_dir():
            continue
        if raw := _undecodable_name(info, undecodable):
            shown = raw.decode("utf-8", "backslashreplace")
            report.errors.append(f"{path}:{shown}: name is not UTF-8, though the archive says it is (skipped)")
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
        elif info.file_size > MAX_ENTRY_RATIO * max(info.compress_size, 1):
            ratio = info.file_size / max(info.compress_size, 1)
            report.errors.append(
                f"{origin}: unpacks to {ratio:.0f} times its compressed size, over the {MAX_ENTRY_RATIO}:1 limit "
                "(refused)"
            )
        else:
            read = lambda i=info, o=origin: _read_member(archive, i, o, max_bytes)  # noqa: E731
            yield Entry(origin, *where, size=info.file_size, packed=info.compress_size, read=read)


def _mb(n: int) -> str:
    return f"{n / 2**20:.{0 if n >= 10 * 2**20 else 2}f} MB"


def _gb(n: int) -> str:
    return f"{n / GB:.{1 if n >= GB else 4}f} GB"


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, origin: str, max_bytes: int) -> bytes:
    try:
        with archive.open(info) as stream:  # the size recorded in the header may lie: the read is bounded
            return read_bytes(stream, origin, max_bytes)
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - a broken member (bad CRC, bad deflate data, bad name) is its own error
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
            try:
                info = path.lstat()
            except OSError as exc:
                report.errors.append(f"{path}: cannot be read ({exc.strerror or exc})")
                continue
            if stat.S_ISLNK(info.st_mode):
                report.errors.append(f"{path}: a link, not a file (refused)")
                continue
            if info.st_size > max_bytes:
                report.errors.append(f"{path}: {_mb(info.st_size)}, over the {_mb(max_bytes)} limit (refused)")
                continue
            found.append((len(path.relative_to(root).parts), str(path), where, info.st_size))
    for _depth, path, where, size in sorted(found):
        yield Entry(path, *where, size=size, packed=None, read=lambda p=path: read_bytes(p, p, max_bytes))


def _entries(source: Path, max_bytes: int, report: PrepareReport, stack: ExitStack) -> Iterator[Entry]:
    if source.is_dir():
        return _folder_entries(source, max_bytes, report)
    if source.is_file():
        try:
            file = stack.enter_context(_ArchiveFile(source))
            archive = stack.enter_context(zipfile.ZipFile(file))
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
            raise ConfigError(f"{source}: not a readable zip archive ({exc})") from None
        file.listing = False
        return _zip_entries(source, archive, file.undecodable, max_bytes, report)
    raise ConfigError(f"{source}: not found (expected the downloaded zip or its unpacked folder)")


def _file_name(entry: Entry, size: int | None) -> str:
    return entry.name if size is None else str(Path(entry.name).with_suffix(".jpeg"))


class _Names:
    """The files of one run by (split, class, name without case): those its entries are named for, and those given
    since to different images of a name already taken, so that no two images are ever given one file."""

    def __init__(self, keys: set[tuple[str, str, str]]):
        self._taken = keys
        self._lock = threading.Lock()

    def claim(self, entry: Entry, name: str) -> bool:
        key = (entry.split, entry.label, name.casefold())
        with self._lock:
            if key in self._taken:
                return False
            self._taken.add(key)
            return True


def _renamed(job: Job, entry: Entry, size: int | None, digest: str, names: _Names) -> Path:
    """Where a different image goes whose name another one has taken: ``stem~<12 hex of its sha256>.ext``, or
    with the whole digest where an entry of the archive is already named so."""
    name = Path(_file_name(entry, size))
    for digits in (12, 64):
        renamed = f"{name.stem}~{digest[:digits]}{name.suffix}"
        if names.claim(entry, renamed):
            return job.target.with_name(renamed)
    raise ImageError(entry.origin, "a different image has its name, and so do the names it could be given instead")


def _convert(data: bytes, entry: Entry, size: int | None) -> bytes:
    """What is written for an entry, once the project's one image loader has decoded it as the format its name
    says: its bytes, or with ``size`` the resized grey JPEG that loader makes (aspect ratio squashed, as the
    shared 224 px set)."""
    suffix = Path(entry.name).suffix.lower()
    found = sniff(data, entry.name)
    if found is None:
        raise ImageError(entry.origin, UNSUPPORTED, "unsupported")
    if found != SUFFIX_FORMATS[suffix]:
        raise ImageError(entry.origin, f"named {suffix} but holds a {found.upper()} image", "unsupported")
    source = io.BytesIO(data)
    source.name = entry.origin
    if size is None:
        load_image(source)  # decodes, or says why not
        return data
    from PIL import Image

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


def _start_output(out: Path, size: int | None) -> tuple[bool, bool]:
    """Make ``out`` and its marker where they are missing; (whether out, whether the marker was made now)."""
    import json

    made_out, marker = not out.exists(), out / MARKER
    if marker.is_file():
        return made_out, False
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(marker, json.dumps({"size": size}).encode())
    return made_out, True


def _done(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


class _Budget:
    """The bytes one run unpacks and the bytes it writes, each bounded by the total limit, counted as they go
    (the sizes an archive declares may lie); and the files it wrote, to take back when the archive is refused."""

    def __init__(self, source: Path, limit_gb: float):
        self.source, self.limit_gb, self.limit = source, limit_gb, int(limit_gb * GB)
        self.unpacked = self.written = 0
        self.files: list[Path] = []
        self._lock = threading.Lock()

    def unpack(self, data: bytes) -> None:
        with self._lock:
            self.unpacked += len(data)
            if self.unpacked > self.limit:
                raise ConfigError(f"{self.source}: its images unpack to more than {self._refused}")

    def write(self, path: Path, data: bytes) -> None:
        with self._lock:
            self.written += len(data)
            if self.written > self.limit:
                raise ConfigError(f"{self.source}: the files written come to more than {self._refused}")
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, data)
        with self._lock:
            self.files.append(path)

    @property
    def _refused(self) -> str:
        return f"the --max-total-gb {self.limit_gb:g} limit (refused, nothing kept)"


@declared(PrepareOptions, "source", "out", "size", "max_total_gb", "progress")
def prepare_dataset(
    source: str | Path,
    out: str | Path,
    size: int | None = DECLARED,
    max_total_gb: float = DECLARED,
    progress: bool = DECLARED,
    max_bytes: int = MAX_FILE_BYTES,
) -> PrepareReport:
    """Lay the Kermany download (zip or folder) ``source`` out as ``out/{split}/{NORMAL,PNEUMONIA}/``;
    with ``size``, as ``size`` x ``size`` grey JPEGs. Files already in place are skipped; entries that
    are links, too large, too compressed, badly named or not the images they are named are listed in the
    report, and the rest written. An archive over ``max_total_gb`` (unpacked or written) or too compressed
    as a whole raises :class:`ConfigError` and leaves nothing behind."""
    source, out = Path(source), Path(out)
    if source.is_dir() and (out.resolve() == source.resolve() or source.resolve() in out.resolve().parents):
        raise ConfigError(f"{out}: the output folder must lie outside the source folder {source}")
    _check_earlier_run(out, size)
    report = PrepareReport()
    with ExitStack() as stack:  # the archive stays open while its entries are written
        jobs, names = _plan(_entries(source, max_bytes, report, stack), source, out, size, report)
        _check_totals(jobs, source, max_total_gb)
        made = _start_output(out, size)
        budget = _Budget(source, max_total_gb)
        try:
            _write_all(jobs, size, progress, budget, names, report)
        except ConfigError:
            _undo(out, budget.files, *made)
            raise
    return report


def _plan(
    entries: Iterator[Entry], source: Path, out: Path, size: int | None, report: PrepareReport
) -> tuple[list[Job], _Names]:
    """The files to write, each with the entries that would become it, and the names they take. Names are
    compared without regard to case (``c.JPEG`` and ``c.jpeg`` are one file with ``--size``, and on a
    case-insensitive disk). A file found in place that only one entry gives is counted as done unread."""
    jobs: dict[tuple[str, str, str], Job] = {}
    for entry in entries:
        if reason := unsafe_name(entry.name):
            report.errors.append(f"{entry.origin}: {reason} (refused)")
            continue
        target = out / entry.split / entry.label / _file_name(entry, size)
        jobs.setdefault((entry.split, entry.label, target.name.casefold()), Job(target, [])).entries.append(entry)
    if not jobs:
        refused = f"; {len(report.errors)} refused, the first: {report.errors[0]}" if report.errors else ""
        raise ConfigError(f"{source}: no images in a {{train,val,test}}/{{NORMAL,PNEUMONIA}} layout found{refused}")
    todo = []
    for job in jobs.values():
        if len(job.entries) == 1 and _done(job.target):
            report.already += 1
        else:
            todo.append(job)
    return todo, _Names(set(jobs))


def _check_totals(jobs: list[Job], source: Path, limit_gb: float) -> None:
    """Refuse the archive, before anything is written, by the sizes its entries declare: the total they unpack to,
    and the ratio to what they take in the archive."""
    entries = [e for job in jobs for e in job.entries]
    total = sum(e.size for e in entries)
    if total > int(limit_gb * GB):
        raise ConfigError(
            f"{source}: its images unpack to {_gb(total)}, over the --max-total-gb {limit_gb:g} limit "
            "(refused, nothing written)"
        )
    zipped = [e for e in entries if e.packed is not None]
    unpacked, packed = sum(e.size for e in zipped), sum(e.packed for e in zipped)
    if zipped and unpacked > MAX_ARCHIVE_RATIO * max(packed, 1):
        raise ConfigError(
            f"{source}: its images unpack to {unpacked / max(packed, 1):.0f} times their compressed size, over the "
            f"{MAX_ARCHIVE_RATIO}:1 limit for an archive of images (refused, nothing written)"
        )


def _undo(out: Path, files: list[Path], made_out: bool, made_marker: bool) -> None:
    """Take back what a run refused whole wrote: its files, the folders left empty, the marker it made."""
    for path in files:
        path.unlink(missing_ok=True)
    if made_marker:
        (out / MARKER).unlink(missing_ok=True)
    folders = sorted({p.parent for p in files} | {p.parent.parent for p in files}, key=lambda p: -len(p.parts))
    for folder in folders + ([out] if made_out else []):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty


def _write_job(job: Job, size: int | None, budget: _Budget, names: _Names) -> list[tuple[Entry, str, str | None]]:
    """Each entry of one job as (entry, what happened, a line to report): the first image gets the job's file,
    each different image after it its own name with its digest; a byte-identical copy is a duplicate."""
    outcomes: list[tuple[Entry, str, str | None]] = []
    seen: set[str] = set()
    taken = False  # whether an image has the job's file
    for entry in job.entries:
        try:
            data = entry.read()
            budget.unpack(data)
            digest = hashlib.sha256(data).hexdigest()
            if digest in seen:
                outcomes.append((entry, "duplicate", None))
                continue
            seen.add(digest)
            target = _renamed(job, entry, size, digest, names) if taken else job.target
            if _done(target):
                outcomes.append((entry, "already", None))
            else:
                budget.write(target, _convert(data, entry, size))
                outcomes.append((entry, "written", _rename_line(entry, job, target) if taken else None))
            taken = True
        except ImageError as exc:
            outcomes.append((entry, "error", str(exc)))
    return outcomes


def _rename_line(entry: Entry, job: Job, target: Path) -> str:
    taken_by = f"{entry.split}/{entry.label}/{job.target.name}"
    return f"{entry.origin}: written as {target.name}, {taken_by} being a different image"


def _write_all(
    jobs: list[Job], size: int | None, progress: bool, budget: _Budget, names: _Names, report: PrepareReport
) -> None:
    from tqdm import tqdm

    def one(job: Job) -> list[tuple[Entry, str, str | None]]:
        return _write_job(job, size, budget, names)

    with tqdm(total=sum(len(j.entries) for j in jobs), desc="preparing", unit="img", disable=not progress) as bar:
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            for start in range(0, len(jobs), _CHUNK):
                for outcomes in pool.map(one, jobs[start : start + _CHUNK]):
                    for entry, what, line in outcomes:
                        _record(report, entry, what, line)
                    bar.update(len(outcomes))


def _record(report: PrepareReport, entry: Entry, what: str, line: str | None) -> None:
    if what == "error":
        report.errors.append(line)
        return
    if what == "duplicate":
        report.duplicates += 1
    elif what == "already":
        report.already += 1
    else:
        report.count(entry.split, entry.label)
    if line:
        report.renamed.append(line)
