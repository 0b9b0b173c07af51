"""Writing predictions for people and programs: table, CSV, JSON lines, Grad-CAM overlays.

Names come from whoever made the files. JSON lines keep them exact (JSON escapes what it must);
the table and error lines escape control characters (:func:`text.printable`); CSV cells never start
a spreadsheet formula (:func:`text.csv_cell`).
"""

from __future__ import annotations

import csv
import json
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from .errors import ConfigError, ImageError
from .text import csv_cell, printable

FORMATS = ("table", "csv", "jsonl")

# The prediction record, declared once: its fields in order, and the decimals a number is written with.
# JSON lines (and the service's responses) hold the fields a result has (:func:`record`); CSV, an
# evaluation's predictions.csv and the table hold the columns below, from the same record.
FIELDS = (
    "path", "probability", "label", "threshold", "error",
    "gate_score", "gate_limit", "gate", "subtype", "viral_probability", "warnings",
)  # fmt: skip
DIGITS = {"probability": 6, "threshold": 6, "gate_score": 3, "gate_limit": 3, "viral_probability": 6}
CSV_COLUMNS = tuple(f for f in FIELDS if f != "gate_limit")  # the limit is the bundle's, the same on every row
MAX_NAME_BYTES = 200  # file names we make stay well inside the usual 255-byte limit


def ensure_folder(path: str | Path) -> Path:
    """An output folder that exists and can be written, or one line saying why not (before any work)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{printable(path)}: output folder is an existing file")
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as exc:
        raise ConfigError(f"{printable(path)}: output folder cannot be written ({exc.strerror or exc})") from None
    return path


def record(result) -> dict:
    """One result as the fields it has: path and error, or path, probability, label and threshold (with
    subtype and viral probability for PNEUMONIA where the bundle has the head); gate score and limit
    where the bundle has a gate, and ``"gate": "off"`` when it was not applied."""
    out = {"path": result.path}
    if result.error is not None:
        out["error"] = result.error
    else:
        out.update(probability=result.probability, label=result.label, threshold=result.threshold)
        if result.subtype is not None:
            out.update(subtype=result.subtype, viral_probability=result.viral_probability)
        if result.warnings:
            out["warnings"] = list(result.warnings)
    if result.gate_score is not None:
        out.update(gate_score=result.gate_score, gate_limit=result.gate_limit)
        if not result.gated:
            out["gate"] = "off"
    return {name: out[name] for name in FIELDS if name in out}  # in the declared order


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


def paths_done(path: Path, fmt: str) -> set[str]:
    """The inputs a results file already holds (as written: CSV cells escaped), for --resume. A last line
    torn by a kill is cut off, so that appending goes on from a whole line."""
    if not path.is_file():
        return set()
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    lines = complete.decode("utf-8", "surrogateescape").splitlines()
    if fmt == "jsonl":
        done = set()
        for n, line in enumerate(lines, 1):
            try:
                done.add(json.loads(line)["path"])
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"{printable(path)}: line {n} is not a result written by pneumoscan") from None
        return done
    rows = list(csv.reader(lines))
    if rows and tuple(rows[0]) != CSV_COLUMNS:
        raise ConfigError(f"{printable(path)}: not a CSV written by pneumoscan predict (header differs)")
    return {row[0] for row in rows[1:] if row}


def result_key(name: str, fmt: str) -> str:
    """How an input's name stands in a results file of this format."""
    return csv_cell(name) if fmt == "csv" else name


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
