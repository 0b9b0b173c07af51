"""Options declared once. A config dataclass gives each field a default, a help text and its allowed
values with :func:`option`; the CLI builds its flags from them (:func:`add_options`), builds the config
from parsed arguments in one step (:func:`from_args`), and :func:`check` validates any instance the
same way, whether it came from the CLI, the Python API or a run folder on disk."""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class Spec:
    help: str
    choices: tuple | None = None
    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    below: float | None = None
    flag: str | None = None  # the CLI flag, where it is not --field-name
    path: bool = False  # a file or folder name: never empty (see checked_path)

    def describe_range(self) -> str:
        bounds = ((">=", self.at_least), (">", self.above), ("<=", self.at_most), ("<", self.below))
        return " and ".join(f"{op} {value:g}" for op, value in bounds if value is not None)


EMPTY_PATH = "empty path (name a file or folder; '.' for the current folder)"


def checked_path(value: str | os.PathLike, what: str = "path") -> Path:
    """A file or folder name given by a user, as a Path. The one rule for every path the CLI and the API
    take: the empty string is refused (``Path("")`` would silently mean the current folder)."""
    if value is None or not str(os.fspath(value)).strip():
        raise ConfigError(f"{what}: {EMPTY_PATH}")
    return Path(value)


def path_argument(text: str) -> str:
    """An argparse type for path options: :func:`checked_path`'s rule as a usage error."""
    if not text.strip():
        raise argparse.ArgumentTypeError(EMPTY_PATH)
    return text


def option(default: Any = MISSING, help: str = "", **spec) -> Any:
    """A dataclass field with its CLI help and allowed values (``choices``, ``at_least``, ``above``,
    ``at_most``, ``below``, ``flag``)."""
    return field(default=default, metadata={"spec": Spec(help, **spec)})


def _spec(f) -> Spec | None:
    return f.metadata.get("spec")


def _kind(f) -> tuple[type, bool]:
    """(base type, whether None is allowed) from the field's annotation."""
    text = str(f.type).replace(" ", "")
    optional = "None" in text.split("|")
    base = text.split("|")[0]
    return {"int": int, "float": float, "str": str, "bool": bool}.get(base, object), optional


def flag_name(f) -> str:
    spec = _spec(f)
    return spec.flag if spec and spec.flag else "--" + f.name.replace("_", "-")


def check(config) -> None:
    """Validate every declared option of ``config``; one line naming the option and the rule."""
    for f in fields(config):
        spec = _spec(f)
        if spec is None:
            continue
        value = getattr(config, f.name)
        name = flag_name(f).removeprefix("--no-").lstrip("-")
        kind, optional = _kind(f)
        if value is None:
            if optional or f.default is None:
                continue
            raise ConfigError(f"--{name} is required")
        accepted = (int, float) if kind is float else kind
        if kind is not object and (not isinstance(value, accepted) or (kind is not bool and isinstance(value, bool))):
            raise ConfigError(f"--{name} must be {kind.__name__}, got {value!r}")
        if spec.path:
            checked_path(value, f"--{name}")
        if kind is float and not math.isfinite(value):
            raise ConfigError(f"--{name} must be a finite number, got {value!r}")
        if spec.choices is not None and value not in spec.choices:
            raise ConfigError(f"--{name} must be one of {', '.join(map(str, spec.choices))}, got {value!r}")
        if kind in (int, float) and not _in_range(value, spec):
            raise ConfigError(f"--{name} must be {spec.describe_range()}, got {value!r}")


def _in_range(value: float, spec: Spec) -> bool:
    return (
        (spec.at_least is None or value >= spec.at_least)
        and (spec.above is None or value > spec.above)
        and (spec.at_most is None or value <= spec.at_most)
        and (spec.below is None or value < spec.below)
    )


def add_options(parser, cls, skip: tuple[str, ...] = ()) -> None:
    """One CLI flag per declared option of the dataclass ``cls``, with its default in the help."""
    for f in fields(cls):
        spec = _spec(f)
        if spec is None or f.name in skip:
            continue
        kind, _ = _kind(f)
        default = None if f.default is MISSING else f.default
        if kind is bool:
            action = "store_false" if default else "store_true"
            parser.add_argument(flag_name(f), dest=f.name, action=action, help=spec.help)
            continue
        shown = "" if default is None else f" (default {default})"
        allowed = f"; {spec.describe_range()}" if spec.describe_range() else ""
        parser.add_argument(
            flag_name(f),
            dest=f.name,
            type=path_argument if spec.path else kind if kind is not object else str,
            choices=spec.choices,
            default=argparse.SUPPRESS,
            metavar=None if spec.choices else f.name.upper().split("_")[-1],
            help=f"{spec.help}{shown}{allowed}".replace("%", "%%"),
        )


def given(cls, args: argparse.Namespace) -> dict[str, Any]:
    """The declared options of ``cls`` that were given on the command line (flags have no defaults in
    the parsed arguments, so what is there was given)."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if _spec(f) and hasattr(args, f.name)}


def from_args(cls, args: argparse.Namespace, **extra):
    """An instance of ``cls`` from parsed arguments (flags not given keep the dataclass defaults)."""
    given = {f.name: getattr(args, f.name) for f in fields(cls) if _spec(f) and hasattr(args, f.name)}
    return cls(**{**given, **extra})
