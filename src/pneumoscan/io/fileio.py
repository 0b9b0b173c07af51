"""File helpers: atomic writes, JSON written atomically, and JSON objects read from files someone else
may have made (bounded size and nesting, no NaN or Infinity, one line naming the file when anything is off).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from pneumoscan.core.errors import ConfigError
from pneumoscan.core.settings import checked_path
from pneumoscan.core.text import printable

MAX_JSON_BYTES = 4 * 2**20
MAX_JSON_DEPTH = 32


def _no_constants(name: str):
    raise ValueError(f"{name} is not a JSON number")


def read_json_object(path: Path, what: str) -> dict:
    """A JSON object from a file someone else may have made: bounded size and nesting, no NaN or
    Infinity, one line naming the file when anything is off."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise ConfigError(
                f"{path}: {what} is {size / 2**20:.1f} MB, over the {MAX_JSON_BYTES / 2**20:.0f} MB limit"
            )
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc.strerror or exc})") from None
    return parse_json_object(data, path, what)


def parse_json_object(data: bytes, path: Path, what: str) -> dict:
    """:func:`read_json_object` on bytes already read (at most :data:`MAX_JSON_BYTES`) from ``path``."""
    try:
        if len(data) > MAX_JSON_BYTES:
            raise ConfigError(f"{path}: {what} is over the {MAX_JSON_BYTES / 2**20:.0f} MB limit")
        text = data.decode("utf-8")
        # Nesting is checked before parsing: json's parser recurses once per level.
        if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _bracket_depth(text) > MAX_JSON_DEPTH:
            raise ConfigError(f"{path}: {what} is nested deeper than {MAX_JSON_DEPTH} levels")
        data = json.loads(text, parse_constant=_no_constants)
    except ConfigError:
        raise
    except (OSError, ValueError, RecursionError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0][:150]
        raise ConfigError(f"{path}: not valid JSON ({reason})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: {what} must hold a JSON object, not {type(data).__name__}")
    return data


def _bracket_depth(text: str) -> int:
    """The deepest nesting of brackets outside strings."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            escaped = not escaped and ch == "\\"
            if ch == '"' and not escaped:
                in_string = False
            continue
        if ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def write_json(path: Path, data) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    atomic_write(path, (json.dumps(data, indent=2, default=_jsonable, allow_nan=False) + "\n").encode())


def atomic_write(path: Path, data: bytes | Path) -> None:
    """Write bytes (or a copy of a file) to ``path`` through a temporary file and a rename: readers
    never see half a file, and a failure leaves the old one in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, Path):
                with open(data, "rb") as source:
                    shutil.copyfileobj(source, f, 1 << 20)
            else:
                f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(value):
    if hasattr(value, "item"):
        value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def ensure_folder(path: str | Path) -> Path:
    """An output folder that exists and can be written, or one line saying why not (before any work)."""
    path = checked_path(path, "output folder")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{printable(path)}: output folder is an existing file")
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as exc:
        raise ConfigError(f"{printable(path)}: output folder cannot be written ({exc.strerror or exc})") from None
    return path
