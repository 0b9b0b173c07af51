"""Options declared once. A config dataclass gives each field a default, a help text and its allowed
values with :func:`option`; the CLI builds its flags from them (:func:`add_options`) and reads the flags
given (:func:`given`, which converts their text by the declared type), :func:`check` validates any
instance the same way, whether it came from the CLI, the Python API or a run folder on disk, and
:func:`declared` gives an API function's parameters the declared defaults and checks. A bad value gives
the same one-line error (naming the flag) from the CLI and from the API."""

from __future__ import annotations

import argparse
import functools
import inspect
import math
import os
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from pneumoscan.core.errors import ConfigError


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
    positional: bool = False  # a positional argument (named by its metavar) instead of a flag
    nargs: str | None = None  # argparse's nargs ("+" for one or more, "?" for a flag whose value is optional)
    const: Any = None  # the value of a flag given without one (nargs "?")
    repeat: bool = False  # the flag may be given several times; the value is the list given
    metavar: str | None = None

    @property
    def many(self) -> bool:
        """The value is a list: a repeated flag, or a positional taking one or more."""
        return self.repeat or self.nargs in ("+", "*")

    def describe_range(self) -> str:
        bounds = ((">=", self.at_least), (">", self.above), ("<=", self.at_most), ("<", self.below))
        return " and ".join(f"{op} {_number(value)}" for op, value in bounds if value is not None)


def _number(value: float) -> str:
    """A number as errors and help show it: 3 and 3.0 alike (the CLI reads 3.0 where the API got 3)."""
    return str(value) if isinstance(value, int) else f"{value:g}"


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
    if spec and spec.positional:
        return spec.metavar or f.name.upper()
    return spec.flag if spec and spec.flag else "--" + f.name.replace("_", "-")


def _shown_name(f) -> str:
    """How errors name an option: its flag (``--no-gate`` as ``--gate``), or a positional's metavar."""
    name = flag_name(f)
    return "--" + name.removeprefix("--no-").lstrip("-") if name.startswith("-") else name


def check(config) -> None:
    """Validate every declared option of ``config``; one line naming the option and the rule."""
    check_values(type(config), {f.name: getattr(config, f.name) for f in fields(config)})


def check_values(cls, values: dict[str, Any]) -> None:
    """Validate ``values`` (field name -> value) by the options ``cls`` declares under those names."""
    for f in fields(cls):
        spec = _spec(f)
        if spec is None or f.name not in values:
            continue
        value = values[f.name]
        items = value if spec.many and isinstance(value, (list, tuple)) else [value]
        if spec.many and value is not None and not isinstance(value, (list, tuple)):
            raise ConfigError(f"{_shown_name(f)} must be a list, got {value!r}")
        for item in items:
            _check_one(f, spec, item)


def _check_one(f, spec: Spec, value: Any) -> None:
    name = _shown_name(f)
    kind, optional = _kind(f)
    if value is None:
        if optional or f.default is None:
            return
        raise ConfigError(f"{name} is required")
    if spec.path and isinstance(value, (str, os.PathLike)):  # a file or folder name, as text or a Path
        checked_path(value, name)
        return
    if spec.many:
        kind = object
    accepted = (int, float) if kind is float else kind
    if kind is not object and (not isinstance(value, accepted) or (kind is not bool and isinstance(value, bool))):
        raise ConfigError(f"{name} must be {kind.__name__}, got {value!r}")
    if spec.path:
        checked_path(value, name)
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if spec.choices is not None and value not in spec.choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, spec.choices))}, got {value!r}")
    if kind in (int, float) and not _in_range(value, spec):
        raise ConfigError(f"{name} must be {spec.describe_range()}, got {_number(value)}")


def _in_range(value: float, spec: Spec) -> bool:
    return (
        (spec.at_least is None or value >= spec.at_least)
        and (spec.above is None or value > spec.above)
        and (spec.at_most is None or value <= spec.at_most)
        and (spec.below is None or value < spec.below)
    )


def add_options(parser, cls, skip: tuple[str, ...] = ()) -> None:
    """One CLI argument per declared option of the dataclass ``cls``, its default and rule in the help.
    Values are parsed as text and converted and checked by :func:`given` and :func:`check`, so a bad
    value gives the same error as from the API (argparse checks only the count of values)."""
    for f in fields(cls):
        spec = _spec(f)
        if spec is None or f.name in skip:
            continue
        kind, _ = _kind(f)
        required = f.default is MISSING and f.default_factory is MISSING
        default = None if f.default is MISSING else f.default
        if kind is bool:
            action = "store_false" if default else "store_true"
            parser.add_argument(flag_name(f), dest=f.name, action=action, help=spec.help.replace("%", "%%"))
            continue
        shown = "" if default is None or required else f" (default {default})"
        allowed = f"; {spec.describe_range()}" if spec.describe_range() else ""
        metavar = spec.metavar or f.name.upper().split("_")[-1]
        if spec.choices:
            metavar = "{" + ",".join(map(str, spec.choices)) + "}"
        text = f"{spec.help}{shown}{allowed}".replace("%", "%%")
        if spec.positional:
            parser.add_argument(f.name, nargs=spec.nargs, metavar=metavar, help=text)
            continue
        parser.add_argument(
            flag_name(f),
            dest=f.name,
            action="append" if spec.repeat else "store",
            nargs=spec.nargs,
            const=None if spec.const is None else str(spec.const),
            required=required,
            default=argparse.SUPPRESS,
            metavar=metavar,
            help=text,
        )


def _converted(f, text: Any) -> Any:
    """A flag's text as the option's declared type (int, float), or one line naming the flag (a path option's
    text is checked as a path at once: a config with other checks first would otherwise see it as missing)."""
    if isinstance(text, list):
        return [_converted(f, t) for t in text]
    kind, _ = _kind(f)
    if _spec(f).path and isinstance(text, str):
        checked_path(text, _shown_name(f))  # the empty-path rule, as the API applies it
    if kind in (int, float) and isinstance(text, str):
        try:
            return kind(text)
        except ValueError:
            raise ConfigError(f"{_shown_name(f)} must be {kind.__name__}, got {text!r}") from None
    return text


def given(cls, args: argparse.Namespace) -> dict[str, Any]:
    """The declared options of ``cls`` that were given on the command line, converted to their types
    (flags have no defaults in the parsed arguments, so what is there was given)."""
    return {f.name: _converted(f, getattr(args, f.name)) for f in fields(cls) if _spec(f) and hasattr(args, f.name)}


def from_args(cls, args: argparse.Namespace, **extra):
    """An instance of ``cls`` from parsed arguments (flags not given keep the dataclass defaults)."""
    return cls(**{**given(cls, args), **extra})


class _Declared:
    def __repr__(self) -> str:
        return "<declared>"


DECLARED: Any = _Declared()  # an API parameter's default: the one its options class declares


def default_of(cls, name: str) -> Any:
    f = next(f for f in fields(cls) if f.name == name)
    return f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default


def declared(cls, *names: str, **renamed: str) -> Callable:
    """Decorate an API function whose parameters ``names`` (and ``renamed``: parameter -> option) are
    options of ``cls``: a parameter written ``= DECLARED`` takes the declared default, and every value is
    checked by the declared rule before the function runs, with the CLI's one-line error."""
    mapping = {**{n: n for n in names}, **renamed}
    known = {f.name for f in fields(cls)}
    if set(mapping.values()) - known:
        raise TypeError(f"{cls.__name__} declares no {sorted(set(mapping.values()) - known)}")

    def wrap(func: Callable) -> Callable:
        signature = inspect.signature(func)
        parameters = []
        for p in signature.parameters.values():
            if p.default is DECLARED:
                if p.name not in mapping:
                    raise TypeError(f"{func.__qualname__}: {p.name} is not an option of {cls.__name__}")
                p = p.replace(default=default_of(cls, mapping[p.name]))
            parameters.append(p)
        signature = signature.replace(parameters=parameters)

        @functools.wraps(func)
        def checked(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            check_values(cls, {mapping[k]: v for k, v in bound.arguments.items() if k in mapping})
            return func(*bound.args, **bound.kwargs)

        checked.__signature__ = signature
        checked.declared = (cls, mapping)  # which parameters are which options, for tests and tools
        return checked

    return wrap
