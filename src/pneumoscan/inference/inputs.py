"""What a command line's inputs mean: files, folders and glob patterns expanded into files, problems into results."""

from __future__ import annotations

import fnmatch
import glob
import os
from collections.abc import Iterable
from pathlib import Path

from pneumoscan.inference.result import Prediction


def expand_inputs(paths: Iterable[str | os.PathLike]) -> list[Path | Prediction]:
    """Files, folders (recursive) and glob patterns to image files, in argument order; an argument
    that matches nothing becomes a :class:`Prediction` carrying its error, in its place. A pattern's
    matches are expanded as if each were given itself (a folder walked, any other entry read and, where it
    is no image file, reported), so a glob reports what the folder given directly reports."""
    items: list[Path | Prediction] = []
    for arg in map(str, paths):
        if not arg.strip():
            items.append(Prediction(arg, error="empty path"))
        elif glob.has_magic(arg) and not os.path.lexists(arg):
            problems: list[tuple[str, str]] = []
            matched = glob_files(arg, problems)
            items += [Prediction(where, error=why) for where, why in problems]
            expanded = [item for match in matched for item in _expand_one(match, str(match))]
            items += list(dict.fromkeys(expanded)) or (
                [] if problems else [Prediction(arg, error="pattern matched no files")]
            )
        else:
            items += _expand_one(Path(arg), arg)
    return items


def _expand_one(path: Path, arg: str) -> list[Path | Prediction]:
    from pneumoscan.io.dataset import list_images

    if path.is_dir():
        problems: list[tuple[str, str]] = []
        found = list_images(path, problems)
        errors = [Prediction(where, error=why) for where, why in problems]
        return errors + (
            found or ([] if errors else [Prediction(arg, error="folder holds no images (.jpeg, .jpg, .png, .dcm)")])
        )
    if os.path.lexists(path):
        return [path]  # a FIFO, device or looping link too: the loader names what it is
    return [Prediction(arg, error="no such file or folder")]


def glob_files(pattern: str, problems: list[tuple[str, str]] | None = None) -> list[Path]:
    """What a glob pattern matches, sorted: files, folders and anything else that is there (``**``: any number
    of folders, hidden ones excepted, as in :func:`glob.glob`). The search keeps its own stack: a tree of any
    depth, no recursion limit; ``**`` does not follow links to folders (no loops). Folders on the way that exist
    but cannot be listed are named, with the reason, in ``problems``."""
    start = os.sep if pattern.startswith(os.sep) else ""
    parts = [part for part in pattern.split(os.sep) if part]
    found: set[str] = set()
    pending: list[tuple[str, int]] = [(start, 0)]
    seen: set[tuple[str, int]] = set()
    while pending:
        prefix, index = pending.pop()
        if (prefix, index) in seen:
            continue
        seen.add((prefix, index))
        if index == len(parts):
            if prefix and os.path.lexists(prefix) and not (parts[-1] == "**" and os.path.isdir(prefix)):
                found.add(prefix)
            continue
        part = parts[index]
        if not glob.has_magic(part):
            pending.append((os.path.join(prefix, part), index + 1))
            continue
        if part == "**":
            pending.append((prefix, index + 1))  # no folder at all
        for entry in _entries(prefix or os.curdir, problems):
            if entry.name.startswith(".") and not part.startswith("."):
                continue
            if part == "**":
                if entry.is_dir(follow_symlinks=False):
                    pending.append((os.path.join(prefix, entry.name), index))  # one folder more
                elif index == len(parts) - 1:  # a last ** matches files too
                    pending.append((os.path.join(prefix, entry.name), index + 1))
            elif fnmatch.fnmatchcase(entry.name, part):
                pending.append((os.path.join(prefix, entry.name), index + 1))
    return sorted(Path(p) for p in found)


def _entries(folder: str, problems: list[tuple[str, str]] | None = None) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError):  # nothing there to match, as in glob.glob
        return []
    except OSError as exc:  # there, but it cannot be listed: said, never silently empty
        if problems is not None:
            problems.append((folder, f"folder cannot be listed ({exc.strerror or exc})"))
        return []
