"""Opening any model folder: a single bundle or an ensemble, by path or by a bundled model's name."""

from __future__ import annotations

import os
from pathlib import Path

from pneumoscan.core.errors import ConfigError
from pneumoscan.core.package import PACKAGE
from pneumoscan.io.fileio import read_json_object
from pneumoscan.model.bundle import Bundle, load_single
from pneumoscan.model.ensemble import Ensemble
from pneumoscan.model.schema import CONFIG, ENSEMBLE_FORMAT, MAX_FILE_BYTES, bundle_file


def default_bundle_path() -> Path:
    return PACKAGE / "default_model"


# Models that ship inside the package, by name (--model NAME): the folder under src/pneumoscan/ that
# holds each. A name is looked up only when no file or folder of that name exists (a path wins).
BUNDLED_MODELS = {
    "default": "default_model",  # the fine-tuned EfficientNet-Lite0 (224 px)
    "fast": "default_model",  # the same model, by the name earlier releases gave it
}


def resolve_model(path: str | Path | None) -> Path:
    """The folder ``--model`` means: the packaged default for None; an existing path as given; else a
    bundled model's name (:data:`BUNDLED_MODELS`); else the path as given (its loader says what is wrong)."""
    from pneumoscan.core.settings import checked_path

    if path is None:
        return default_bundle_path()
    raw = os.fspath(checked_path(path, "--model")) if isinstance(path, Path) else str(path)
    if raw in BUNDLED_MODELS and not os.path.lexists(raw):  # the name as typed: "./fast" is always a path
        return PACKAGE / BUNDLED_MODELS[raw]
    return checked_path(path, "--model")


def load_bundle(path: str | Path | None = None) -> Bundle:
    """Open and verify a bundle (the packaged default when ``path`` is None): config and metrics
    validated, and the sha256 of the weights and of every recorded ONNX model checked."""
    path = resolve_model(path)
    if path.is_file() and path.name == CONFIG:
        path = path.parent
    if not path.is_dir() or not os.path.lexists(path / CONFIG):
        if path.resolve().is_relative_to(PACKAGE):
            raise ConfigError(
                f"no bundled model in this install ({path} is missing); "
                "pass --model BUNDLE (a folder made by pneumoscan train)"
            )
        hint = "" if os.path.lexists(path) else f" and not a bundled model's name ({', '.join(BUNDLED_MODELS)})"
        raise ConfigError(f"{path}: not a model bundle (no {CONFIG}){hint}")
    present = {name for name in MAX_FILE_BYTES if bundle_file(path, name) is not None}  # every file checked
    config = read_json_object(path / CONFIG, "config.json")
    if config.get("format") == ENSEMBLE_FORMAT:
        from pneumoscan.model.ensemble import load_ensemble

        return load_ensemble(path, config)
    return load_single(path, config, present)


def bundled_models_table() -> str:
    """Two lines per bundled model of :data:`bundle.BUNDLED_MODELS` (one for a second name of the same folder):
    its name and bundle name, then what it is, its size and the accuracy its metrics record (test where
    recorded, else validation)."""
    from pneumoscan.core.text import number, printable

    rows, seen = [], {}
    for name in BUNDLED_MODELS:
        if BUNDLED_MODELS[name] in seen:
            rows.append(f"{name:<8} the same model as {seen[BUNDLED_MODELS[name]]} (the name earlier releases gave it)")
            continue
        seen[BUNDLED_MODELS[name]] = name
        try:
            bundle = load_bundle(resolve_model(name))
        except ConfigError as exc:
            rows.append(f"{name:<8} unavailable: {printable(exc)}")
            continue
        kind = f"ensemble of {len(bundle.members)}" if isinstance(bundle, Ensemble) else bundle.backbone
        split = "test" if "test" in bundle.metrics else "validation"
        r = bundle.metrics.get(split) or {}
        ci = (r.get("ci95") or {}).get("auc") or [None, None]
        accuracy = (
            f"{split}: AUC {number(r.get('auc'))} ({number(ci[0])}-{number(ci[1])}), "
            f"accuracy {number(r.get('accuracy'))} at threshold {number(r.get('threshold'))}"
            if r
            else "no metrics recorded"
        )
        rows.append(f"{name:<8} {printable(bundle.name)}")
        rows.append(f"{'':<8} {kind}, {bundle.parameter_count() / 1e6:.1f} M parameters; {accuracy}")
        runs_int8, why = bundle.int8_status()
        rows.append(f"{'':<8} engine: {'int8' if runs_int8 else 'fp32'} by default ({printable(why)})")
    rows.append("speed: docs/benchmarks.md; python benchmarks/predict_cli.py --model NAME measures it here")
    return "\n".join(rows)
