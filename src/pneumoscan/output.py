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
CSV_COLUMNS = ("path", "probability", "label", "threshold", "error")
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


def _csv_row(result, sample=None) -> list[str]:
    row = [
        result.path,
        "" if result.probability is None else f"{result.probability:.6f}",
        result.label or "",
        "" if result.threshold is None else f"{result.threshold:.6f}",
        result.error or "",
    ]
    if sample is not None:
        row += [sample.patient, sample.label_name]
    return [csv_cell(cell) for cell in row]


def write_predictions(results: Iterable, fmt: str, stream: TextIO = sys.stdout) -> None:
    """Predictions to a stream as a table, CSV or JSON lines."""
    results = list(results)
    if fmt == "jsonl":
        for r in results:
            stream.write(json.dumps(r.to_dict()) + "\n")
    elif fmt == "csv":
        writer = csv.writer(stream)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(_csv_row(r) for r in results)
    elif fmt == "table":
        stream.write(f"{'label':<10} {'probability':>11}  path\n")
        for r in results:
            if r.ok:
                stream.write(f"{r.label:<10} {r.probability:>11.4f}  {printable(r.path)}\n")
            else:
                stream.write(f"{'ERROR':<10} {'':>11}  {printable(r.path)}: {printable(r.error)}\n")
        ok = sum(r.ok for r in results)
        threshold = next((r.threshold for r in results if r.ok), None)
        stream.write(
            f"{ok} classified, {len(results) - ok} failed"
            + (f"; PNEUMONIA when probability >= {threshold:.4f}\n" if threshold is not None else "\n")
        )
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


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
