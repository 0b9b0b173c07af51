"""Writing predictions for people and programs: table, CSV, JSON lines, Grad-CAM overlays."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import TextIO

from .errors import ImageError
from .inference import Classifier, Prediction


def write_predictions(results: list[Prediction], fmt: str, stream: TextIO = sys.stdout) -> None:
    if fmt == "jsonl":
        for r in results:
            stream.write(json.dumps(r.to_dict()) + "\n")
    elif fmt == "csv":
        writer = csv.writer(stream)
        writer.writerow(["path", "probability", "label", "threshold", "error"])
        for r in results:
            writer.writerow(
                [
                    r.path,
                    "" if r.probability is None else f"{r.probability:.6f}",
                    r.label or "",
                    "" if r.threshold is None else f"{r.threshold:.6f}",
                    r.error or "",
                ]
            )
    elif fmt == "table":
        stream.write(f"{'label':<10} {'probability':>11}  path\n")
        for r in results:
            if r.ok:
                stream.write(f"{r.label:<10} {r.probability:>11.4f}  {r.path}\n")
            else:
                stream.write(f"{'ERROR':<10} {'':>11}  {r.path}: {r.error}\n")
        ok = sum(r.ok for r in results)
        threshold = next((r.threshold for r in results if r.ok), None)
        stream.write(
            f"{ok} classified, {len(results) - ok} failed"
            + (f"; PNEUMONIA when probability >= {threshold:.4f}\n" if threshold is not None else "\n")
        )
    else:
        raise ValueError(f"unknown format {fmt!r}")


def write_cams(clf: Classifier, results: list[Prediction], folder: Path) -> list[Path]:
    """One Grad-CAM overlay PNG per classified file, named after it (``NAME.cam.png``)."""
    folder.mkdir(parents=True, exist_ok=True)
    written, used = [], set()
    for r in results:
        if not r.ok:
            continue
        name = f"{Path(r.path).stem}.cam.png"
        n = 1
        while name in used:
            n += 1
            name = f"{Path(r.path).stem}-{n}.cam.png"
        used.add(name)
        try:
            written.append(clf.explain(r.path).save(folder / name))
        except ImageError as exc:
            print(f"pneumoscan: {exc}", file=sys.stderr)
    return written
