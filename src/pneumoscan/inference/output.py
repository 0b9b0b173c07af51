"""Writing predictions for people and programs: table, CSV, JSON lines, Grad-CAM overlays.

Names come from whoever made the files. JSON lines keep them exact (JSON escapes what it must);
the table and error lines escape control characters (:func:`text.printable`); CSV cells never start
a spreadsheet formula (:func:`text.csv_cell`).
"""

from __future__ import annotations

import csv
import fcntl
import functools
import io
import json
import os
import stat
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from pneumoscan.core.errors import ConfigError, ImageError
from pneumoscan.core.options import FORMATS
from pneumoscan.core.settings import checked_path
from pneumoscan.core.text import csv_cell, csv_value, printable
from pneumoscan.inference.result import CSV_COLUMNS, DIGITS, record
from pneumoscan.io.fileio import atomic_write, ensure_folder, read_json_object

MAX_NAME_BYTES = 200  # file names we make stay well inside the usual 255-byte limit


def _text(fields: dict, name: str) -> str:
    value = fields.get(name)
    if value is None:
        return ""
    if isinstance(value, list):
        return "; ".join(value)
    return f"{value:.{DIGITS[name]}f}" if name in DIGITS else str(value)


def _csv_row(result, sample=None) -> list[str]:
    fields = record(result)
    row = [_text(fields, name) for name in CSV_COLUMNS]
    if sample is not None:
        row += [sample.patient, sample.label_name]
    return [csv_cell(cell) for cell in row]


# the table's columns before the path: (header, width, right-aligned)
TABLE = (("label", 10, False), ("probability", 11, True), ("subtype", 9, False), ("p(viral)", 8, True))


def _table_row(cells: list[str]) -> str:
    """Cells under the TABLE headers, then the path (unpadded, last)."""
    padded = [f"{c:>{w}}" if right else f"{c:<{w}}" for (_, w, right), c in zip(TABLE, cells)]
    return "  ".join(padded + cells[len(TABLE) :])


def _table_line(r) -> str:
    if not r.ok:
        return _table_row(["ERROR", "", "", "", f"{printable(r.path)}: {printable(r.error)}"])
    viral = "" if r.viral_probability is None else f"{r.viral_probability:.2f}"
    return _table_row([r.label, f"{r.probability:.4f}", r.subtype or "", viral, printable(r.path)])


class PredictionWriter:
    """Writes predictions as they come, as a table, CSV or JSON lines, and counts them."""

    def __init__(self, stream: TextIO, fmt: str, header: bool = True):
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
        self.stream, self.fmt = stream, fmt
        self.ok = self.failed = 0
        self.threshold = None
        self.gate_off = False
        self._csv = csv.writer(stream) if fmt == "csv" else None
        if header and fmt == "csv":
            self._csv.writerow(CSV_COLUMNS)
        elif header and fmt == "table":
            stream.write(_table_row([head for head, _, _ in TABLE] + ["path"]) + "\n")

    def write(self, r) -> None:
        if r.ok:
            self.ok += 1
            self.threshold = r.threshold
            self.gate_off = self.gate_off or (r.gate_score is not None and not r.gated)
        else:
            self.failed += 1
        if self.fmt == "jsonl":
            self.stream.write(json.dumps(record(r)) + "\n")
        elif self.fmt == "csv":
            self._csv.writerow(_csv_row(r))
        else:
            self.stream.write(_table_line(r) + "\n")

    def summary(self) -> str:
        rule = f"; PNEUMONIA when probability >= {self.threshold:.4f}" if self.threshold is not None else ""
        gate = "; input gate off: every image labelled, chest X-ray or not" if self.gate_off else ""
        return f"{self.ok} classified, {self.failed} failed{rule}{gate}"


def write_predictions(results: Iterable, fmt: str, stream: TextIO = sys.stdout) -> None:
    """Predictions to a stream as a table (with a summary line), CSV or JSON lines."""
    writer = PredictionWriter(stream, fmt)
    for r in results:
        writer.write(r)
    if fmt == "table":
        stream.write(writer.summary() + "\n")


def output_format(path: Path) -> str:
    """The format of a results file, from its suffix: .jsonl (or .json) or .csv."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    raise ConfigError(f"{printable(path)}: --output must end in .jsonl or .csv")


RESULTS_FORMAT = "pneumoscan-results/2"  # the settings beside a results file (its sidecar)
LEGACY_FORMAT = "pneumoscan-results/1"  # older files: the settings on their first line (still resumed)
LEGACY_CSV_MARKER = "# " + LEGACY_FORMAT  # such a CSV file's first cell
SIDECAR_SUFFIX = ".pneumoscan.json"  # F.csv -> F.csv.pneumoscan.json
SAME_FOR_RESUME = ("weights_sha256", "engine", "threshold", "temperature", "gate")  # what a resume must match
MAX_RESULT_LINE = 2**20  # longer lines are no result of ours


def results_settings(clf, gate: bool) -> dict:
    """What a results file's sidecar records about the run that made it: the model (name, version and weights
    digest), the engine, the operating point, the gate setting, and the folder relative paths are relative to."""
    return {
        "format": RESULTS_FORMAT,
        "model": clf.bundle.name,
        "version": str(clf.bundle.config.get("version", "")),
        "weights_sha256": clf.bundle.weights_sha256,
        "engine": clf.engine.name,
        "threshold": clf.threshold,
        "temperature": clf.bundle.temperature,
        "gate": "none" if clf.gate is None else "on" if gate else "off",
        "cwd": os.getcwd(),
    }


def sidecar_of(path: str | Path) -> Path:
    """Where the settings of the results file ``path`` are kept: beside it, ``F.csv.pneumoscan.json``."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


class ResultsFile:
    """``predict --output FILE``: a results file opened for appending, locked against other writers.

    The file holds results only (CSV: a header row, then one row per input; JSON lines: one object per
    input), so any reader opens it as it is. The run's settings (:func:`results_settings`) go beside it,
    in ``FILE.pneumoscan.json`` (:func:`sidecar_of`), written atomically before the first row. With
    ``resume``, a file is changed only after its sidecar (or, for a file of ``pneumoscan-results/1``, its
    first line) shows that pneumoscan wrote it with the same model, engine, threshold, temperature and
    gate setting; it is read a line at a time (memory follows the inputs, not the file), inputs are
    matched by resolved path, and only then is a last line torn by a kill cut off. Anything else is a
    :class:`ConfigError` and leaves the file as it was."""

    def __init__(self, path: str | Path, settings: dict, names: list[str], resume: bool = False):
        self.path = checked_path(path, "--output")
        self.fmt = output_format(self.path)
        self.sidecar = sidecar_of(self.path)
        ensure_folder(self.path.parent)
        self._file = self._open_locked()
        try:
            size = os.fstat(self._file.fileno()).st_size
            if size and not resume:
                raise ConfigError(f"{printable(self.path)}: exists; add --resume to continue it, or remove it")
            keys = [_resolved(name, os.getcwd(), self.fmt) for name in names]
            found, end, legacy = self._read(settings, set(keys)) if size else (set(), 0, False)
            self.done = [key in found for key in keys]  # every spelling of a file already in it
            if not end and not legacy:
                self._write_sidecar(settings)  # before the first row (and before a torn header is cut)
            if end < size:  # a last line torn by a kill: cut, now that the file is known to be ours
                self._file.truncate(end)
            self._file.seek(end)
            self.stream = io.TextIOWrapper(
                self._file, encoding="utf-8", errors="surrogateescape", newline="", line_buffering=True
            )
            if not end and self.fmt == "csv":
                csv.writer(self.stream).writerow(CSV_COLUMNS)
        except BaseException:
            self._file.close()
            raise

    def _open_locked(self):
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NONBLOCK", 0), 0o644)
        except OSError as exc:
            raise ConfigError(f"{printable(self.path)}: cannot be opened ({exc.strerror or exc})") from None
        f = os.fdopen(fd, "r+b")
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigError(f"{printable(self.path)}: --output must be a regular file")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise ConfigError(f"{printable(self.path)}: another pneumoscan is writing this file (locked)") from None
        except BaseException:
            f.close()
            raise
        return f

    def _write_sidecar(self, settings: dict) -> None:
        """The settings beside the file, atomically; a sidecar that is not pneumoscan's is never replaced."""
        if os.path.lexists(self.sidecar):
            self._sidecar_settings()  # ours (any settings: the results file is empty), or a ConfigError
        record = {**settings, "format": RESULTS_FORMAT, "results": self.path.name}
        if self.fmt == "csv":
            record["columns"] = list(CSV_COLUMNS)
        try:
            atomic_write(self.sidecar, (json.dumps(record, indent=2) + "\n").encode())
        except OSError as exc:
            raise ConfigError(f"{printable(self.sidecar)}: cannot be written ({exc.strerror or exc})") from None

    def _sidecar_settings(self) -> dict:
        """The settings in the sidecar, or a ConfigError naming it."""
        if self.sidecar.is_symlink() or not self.sidecar.is_file():
            raise ConfigError(f"{printable(self.sidecar)}: not a regular file; left unchanged")
        recorded = read_json_object(self.sidecar, "results settings")
        if recorded.get("format") != RESULTS_FORMAT:
            raise ConfigError(
                f"{printable(self.sidecar)}: not pneumoscan's results settings (format "
                f"{printable(str(recorded.get('format'))[:40])}, expected {RESULTS_FORMAT}); left unchanged"
            )
        return recorded

    def _lines(self, position: list[int]):
        """The file's whole lines, as text; ``position``: the offset after the last one read, and its number."""
        while True:
            raw = self._file.readline(MAX_RESULT_LINE + 1)
            if len(raw) > MAX_RESULT_LINE:
                raise ConfigError(f"{printable(self.path)}: a line is over {MAX_RESULT_LINE // 1024} KB: not a result")
            if not raw.endswith(b"\n"):  # end of file, or a line torn by a kill
                return
            position[0] += len(raw)
            position[1] += 1
            yield raw.decode("utf-8", "surrogateescape")

    def _read(self, settings: dict, wanted: set[str]) -> tuple[set[str], int, bool]:
        """The keys of ``wanted`` the file holds, the offset after its last whole line, and whether it is a
        file of ``pneumoscan-results/1`` (settings on its first line)."""
        self._file.seek(0)
        position = [0, 0]  # the offset after the last whole line read, and its number
        lines = self._lines(position)
        recorded, legacy = self._recorded(lines)
        changed = [k for k in SAME_FOR_RESUME if recorded.get(k) != settings.get(k)]
        if changed:
            was = ", ".join(f"{k} {printable(recorded.get(k))}" for k in changed)
            now = ", ".join(f"{printable(settings.get(k))}" for k in changed)
            raise ConfigError(
                f"{printable(self.path)}: written with {was}; this run has {now}: resume with the same model and "
                "options, or write another file"
            )
        base = str(recorded.get("cwd") or os.getcwd())
        try:
            found = self._keys(lines, base, wanted, header_required=legacy)
        except (ValueError, RecursionError, csv.Error) as exc:
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).splitlines()[0][:100]
            raise ConfigError(
                f"{printable(self.path)}: line {position[1]} is not a result written by pneumoscan ({reason}); "
                "left unchanged"
            ) from None
        return found, position[0], legacy

    def _keys(self, lines, base: str, wanted: set[str], header_required: bool) -> set[str]:
        """The keys of ``wanted`` among the results in ``lines`` (ValueError at the first that is not one)."""
        found: set[str] = set()
        if self.fmt == "jsonl":
            for line in lines:
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("path"), str):
                    raise ValueError("no path")
                key = _resolved(row["path"], base, "jsonl")
                if key in wanted:
                    found.add(key)
            return found
        rows = csv.reader(lines)
        header = next(rows, None)
        if (header is not None or header_required) and tuple(header or ()) != CSV_COLUMNS:
            raise ValueError("the column header differs")
        for row in rows:
            key = _resolved(csv_value(row[0]), base, "csv") if row else None
            if key in wanted:
                found.add(key)
        return found

    def _recorded(self, lines) -> tuple[dict, bool]:
        """The settings the file was written with: its sidecar's, or (a ``pneumoscan-results/1`` file) its
        first line's, with True; a ConfigError when neither is pneumoscan's."""
        if os.path.lexists(self.sidecar):
            return self._sidecar_settings(), False
        recorded = _legacy_settings(next(lines, ""), self.fmt)
        if recorded is None:
            raise ConfigError(
                f"{printable(self.path)}: not a results file written by pneumoscan predict --output (no "
                f"{printable(self.sidecar.name)} beside it); left unchanged"
            )
        return recorded, True

    def close(self) -> None:
        self.stream.close()  # also releases the lock


def _legacy_settings(first: str, fmt: str) -> dict | None:
    """The settings on the first line of a ``pneumoscan-results/1`` file, or None."""
    try:
        if fmt == "jsonl":
            recorded = json.loads(first)["pneumoscan"] if first.startswith('{"pneumoscan"') else None
        else:
            cells = next(csv.reader([first]), [])
            recorded = json.loads(cells[1]) if len(cells) == 2 and cells[0] == LEGACY_CSV_MARKER else None
    except (ValueError, KeyError, TypeError, RecursionError, csv.Error):
        return None
    return recorded if isinstance(recorded, dict) and recorded.get("format") == LEGACY_FORMAT else None


def _resolved(name: str, base: str, fmt: str) -> str:
    """An input's name as a resume key: relative names joined to ``base``, the folder resolved (links,
    ``..``, ``.``), the file name kept (two links to one image stay two inputs). For CSV, the name goes
    through the same cell conversion as the file's names did."""
    if fmt == "csv":
        name = csv_value(csv_cell(name))
    if not name:
        return name
    folder, leaf = os.path.split(os.path.join(base, name))
    return os.path.join(_real_folder(folder), leaf)


@functools.lru_cache(maxsize=4096)
def _real_folder(folder: str) -> str:
    return os.path.realpath(folder)


def write_prediction_file(path: Path, rows: list) -> None:
    """``predictions.csv`` of an evaluation: the CSV columns of ``predict`` plus patient and true label,
    from ``(Prediction, Sample)`` pairs."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([*CSV_COLUMNS, "patient", "true_label"])
        writer.writerows(_csv_row(result, sample) for result, sample in rows)


def _short_stem(path: str) -> str:
    """A file's stem, cut to fit in a file name of ours (at most MAX_NAME_BYTES bytes in UTF-8)."""
    stem = Path(path).stem.replace(os.sep, "_") or "image"
    encoded = os.fsencode(stem)[:MAX_NAME_BYTES]
    return os.fsdecode(encoded.decode("utf-8", "ignore").encode()) if encoded else "image"


def write_cams(clf, results: list, folder: Path) -> list[Path]:
    """One Grad-CAM overlay PNG per classified file (``NAME.cam.png``); a file that cannot be explained
    or written is named on stderr and the rest go on."""
    folder = ensure_folder(folder)
    written, used = [], set()
    for r in results:
        if not r.ok:
            continue
        stem = _short_stem(r.path)
        name, n = f"{stem}.cam.png", 1
        while name in used:
            n += 1
            name = f"{stem}-{n}.cam.png"
        used.add(name)
        try:
            written.append(clf.explain(r.path).save(folder / name))
        except ImageError as exc:
            print(f"pneumoscan: {printable(exc)}", file=sys.stderr)
        except OSError as exc:
            print(f"pneumoscan: {printable(folder / name)}: cannot be written ({exc.strerror or exc})", file=sys.stderr)
    return written
