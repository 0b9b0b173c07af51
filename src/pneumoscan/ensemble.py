"""Ensembles: one bundle that holds up to eight ordinary bundles and averages their calibrated logits.

An ensemble bundle is a folder with its own ``config.json`` (format ``pneumoscan-ensemble/1``: members,
image size, threshold, temperature), ``metrics.json`` and ``MODEL_CARD.md``, and ``members/<name>/``,
each a complete single bundle loaded with every check of :func:`bundle.load_single`. The ensemble's
config records the sha256 of each member's config.json, which records the sha256 of that member's
weights and ONNX models: one chain of digests covers every file that can change an answer.

The combined logit is the mean over members of ``logit_i / T_i`` (each member's own temperature); the
ensemble's temperature and threshold then apply as for any bundle. The first member is the *primary*:
its pooled features feed the input gate and the bacterial/viral head (its own files), and Grad-CAM
explains it.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .backbones import sha256_file
from .bundle import Bundle, load_bundle, load_single, write_bundle
from .bundle_schema import (
    CARD,
    CONFIG,
    CURVES,
    ENSEMBLE_FORMAT,
    FORMAT,
    METRICS,
    WEIGHTS,
    bundle_file,
    check_schema,
    validate_metrics,
    validate_operating_config,
)
from .errors import ConfigError
from .fileio import MAX_JSON_BYTES, atomic_write, parse_json_object, read_json_object, write_json
from .labels import CLASSES
from .options import EnsembleOptions
from .settings import DECLARED, declared

MEMBERS = "members"  # the folder that holds one folder per member
MAX_MEMBERS = 8  # a deep ensemble of five to eight seeds; each member costs its network time
MEMBER_NAME = re.compile(r"[a-z0-9_-]{1,32}")  # a member's folder name: never a path

_ENSEMBLE_SCHEMA = {
    "format": (str, True),
    "members": (list, True),
    "image_size": (int, True),
    "class_names": (list, True),
    "threshold": ((int, float), True),
    "temperature": ((int, float), True),
    "threshold_rule": (str, False),
    "name": (str, False),
    "version": (str, False),
    "notes": (str, False),
    "pneumoscan_version": (str, False),
    "training": (dict, False),
    "calibration": (dict, False),
}


@dataclass
class Ensemble(Bundle):
    """A loaded ensemble: its own config and metrics, and its member bundles (the first is the primary)."""

    members: list[Bundle] = field(default_factory=list)

    @property
    def member_names(self) -> list[str]:
        return [m["name"] for m in self.config["members"]]

    @property
    def primary(self) -> Bundle:
        """The member whose features feed the gate and the subtype head, and whose Grad-CAM is shown."""
        return self.members[0]

    @property
    def preprocessing(self):
        """The primary's: members see the same prepared images (their preprocessing must agree)."""
        return self.primary.preprocessing

    @property
    def weights_sha256(self) -> str:
        """One digest for the members' weights, in order: sha256 of their weights digests, one per line."""
        return hashlib.sha256("\n".join(m.weights_sha256 for m in self.members).encode()).hexdigest()

    @property
    def backbone(self) -> str:
        return "+".join(m.backbone for m in self.members)

    def member_temperatures(self) -> np.ndarray:
        return np.array([m.temperature for m in self.members], np.float64)

    def parameter_count(self) -> int:
        return sum(m.parameter_count() for m in self.members)

    def training_splits(self, root: str | Path | None = None):
        return self.primary.training_splits(root)

    def load_head(self, name: str):
        return self.primary.load_head(name)  # the primary's features feed every feature head

    def onnx_path(self, int8: bool = False) -> Path | None:
        return None  # each member has its own

    def int8_status(self) -> tuple[bool, str]:
        """Each member runs int8 by default where its own int8 model holds: (all of them do, why)."""
        statuses = [(name, *m.int8_status()) for name, m in zip(self.member_names, self.members)]
        if all(holds for _, holds, _ in statuses):
            return True, "every member's int8 model agrees with its fp32 model"
        return False, "; ".join(f"{name}: {why}" for name, holds, why in statuses if not holds)

    def head_weights(self):
        return None

    def load_net(self):
        raise ConfigError(
            f"{self.path}: an ensemble has no single network; export each member bundle ({MEMBERS}/NAME) "
            "before the ensemble is made"
        )

    def write_copy(self, path: str | Path, config: dict, metrics: dict) -> Ensemble:
        return write_ensemble(path, config, metrics, list(zip(self.member_names, self.members)))


def validate_ensemble_config(config: dict, where: str) -> None:
    """The ensemble schema (types, ranges, member names and digests); one line naming the first problem."""
    check_schema(config, _ENSEMBLE_SCHEMA, where)
    if config["format"] != ENSEMBLE_FORMAT:
        raise ConfigError(f"{where}: unsupported ensemble format {config['format']!r} (expected {ENSEMBLE_FORMAT})")
    members = config["members"]
    if not 1 <= len(members) <= MAX_MEMBERS:
        raise ConfigError(f"{where}: an ensemble holds 1 to {MAX_MEMBERS} members, not {len(members)}")
    names = []
    for member in members:
        if not isinstance(member, dict) or set(member) != {"name", "config_sha256"}:
            raise ConfigError(f'{where}: each of config.json \'members\' must be {{"name", "config_sha256"}}')
        name, digest = member["name"], member["config_sha256"]
        if not isinstance(name, str) or not MEMBER_NAME.fullmatch(name):
            raise ConfigError(f"{where}: member name {str(name)[:40]!r} is not 1-32 of a-z, 0-9, '_', '-'")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ConfigError(f"{where}: member {name}: config_sha256 is not a sha256 hex digest")
        names.append(name)
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: member names repeat ({', '.join(names)})")
    validate_operating_config(config, where)


def _real_folder(path: Path) -> None:
    """``path`` is a folder inside the bundle: not a symbolic link, not a file; one line otherwise."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing (recorded in the ensemble's config.json)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISLNK(info.st_mode):
        raise ConfigError(f"{path}: is a symbolic link; an ensemble's members must be folders inside it")
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{path}: not a folder")


def load_member(folder: Path, digest: str, image_size: int) -> Bundle:
    """One member: its config.json read once, its bytes checked against the ensemble's record, then
    loaded as a single bundle (weights and files checked against that config)."""
    _real_folder(folder)
    config_path = bundle_file(folder, CONFIG)
    if config_path is None:
        raise ConfigError(f"{folder}: not a model bundle (no {CONFIG})")
    with open(config_path, "rb") as f:
        data = f.read(MAX_JSON_BYTES + 1)  # bounded even if the file grew after it was checked
    if hashlib.sha256(data).hexdigest() != digest:
        raise ConfigError(
            f"{config_path}: sha256 does not match the ensemble's config.json (swapped or tampered member)"
        )
    config = parse_json_object(data, config_path, "config.json")
    if config.get("format") != FORMAT:
        raise ConfigError(
            f"{config_path}: a member must be a single model ({FORMAT}), not {str(config.get('format'))[:60]!r}"
        )
    member = load_single(folder, config)
    if member.image_size != image_size:
        raise ConfigError(
            f"{config_path}: image_size {member.image_size} differs from the ensemble's {image_size}; "
            "all members read the same prepared image"
        )
    return member


def check_same_preprocessing(members: list[Bundle]) -> None:
    """Members read one prepared image: each must make it as the primary does."""
    for member in members[1:]:
        if member.preprocessing != members[0].preprocessing:
            raise ConfigError(
                f"{member.path / CONFIG}: preprocessing {member.preprocessing.record()} differs from the primary's "
                f"{members[0].preprocessing.record()}; all members read the same prepared image"
            )


def load_ensemble(path: Path, config: dict) -> Ensemble:
    """Open and verify an ensemble bundle (called by :func:`bundle.load_bundle` for its format)."""
    validate_ensemble_config(config, str(path))
    folder = path / MEMBERS
    _real_folder(folder)
    members = [load_member(folder / m["name"], m["config_sha256"], config["image_size"]) for m in config["members"]]
    check_same_preprocessing(members)
    present = {entry.name for entry in os.scandir(folder)}
    for extra in sorted(present - {m["name"] for m in config["members"]})[:5]:
        warnings.warn(
            f"{folder / extra} is not recorded in the ensemble's config.json and will not be used", stacklevel=3
        )
    metrics_path = bundle_file(path, METRICS)
    metrics = read_json_object(metrics_path, "metrics.json") if metrics_path else {}
    validate_metrics(metrics, str(path))
    return Ensemble(path, config, metrics, members)


def write_ensemble(path: str | Path, config: dict, metrics: dict | None, members: list[tuple[str, Bundle]]) -> Ensemble:
    """The one way an ensemble is written: each member copied into ``members/<name>/`` by the bundle writer
    (unless already there), then config.json recording the sha256 of each member's config.json, then
    metrics.json and the model card."""
    from .model_card import model_card

    path = Path(path)
    written = []
    for name, member in members:
        if not MEMBER_NAME.fullmatch(name):
            raise ConfigError(f"member name {name!r} is not 1-32 of a-z, 0-9, '_', '-'")
        if isinstance(member, Ensemble):
            raise ConfigError(f"{member.path}: an ensemble cannot be a member of another ensemble")
        target = path / MEMBERS / name
        if target.resolve() != member.path.resolve():
            member = _copy_member(member, target)
        written.append((name, member))
    config = {
        "format": ENSEMBLE_FORMAT,
        "pneumoscan_version": __version__,
        "class_names": list(CLASSES),
        **config,
        "members": [{"name": n, "config_sha256": sha256_file(m.path / CONFIG)} for n, m in written],
    }
    validate_ensemble_config(config, str(path))
    metrics = metrics or {}
    validate_metrics(metrics, str(path))
    write_json(path / CONFIG, config)
    write_json(path / METRICS, metrics)
    ensemble = Ensemble(path, config, metrics, [m for _, m in written])
    atomic_write(path / CARD, model_card(ensemble).encode())
    return ensemble


def _copy_member(member: Bundle, target: Path) -> Bundle:
    files = {name: member.path / name for name in member.config.get("files", {})}
    if (member.path / CURVES).is_file() and not (member.path / CURVES).is_symlink():
        files[CURVES] = member.path / CURVES
    return write_bundle(target, member.config, member.metrics, weights=member.path / WEIGHTS, files=files)


def member_name(path: str | Path) -> str:
    """A member name from a bundle's folder name (the run's folder for a bundle ``train`` wrote, RUN/model):
    lower case, other characters as '-', at most 32."""
    folder = Path(path).resolve()
    if folder.name == "model" and folder.parent != folder:
        folder = folder.parent
    name = re.sub(r"[^a-z0-9_-]", "-", folder.name.lower())[:32].strip("-")
    return name or "member"


MIN_HELD_OUT_PER_CLASS = 10  # the fewest images of each class the ensemble's temperature is fitted on


def held_out_of_every_member(members: list[Bundle], data: str | Path | None = None) -> list:
    """The validation images no member was trained on: the primary's validation split of ``data`` (default:
    the training data each member records), less the images any other member trained on. Members trained
    with the same split give the whole split; members trained with different designs (random patients,
    temporal) give the images held out of both, with a warning saying how many."""
    _, validation = members[0].training_splits(data)
    kept = validation
    for member in members[1:]:
        _, theirs = member.training_splits(data)
        held_out = {Path(s.path).resolve() for s in theirs}
        kept = [s for s in kept if Path(s.path).resolve() in held_out]
    counts = [sum(s.label == label for s in kept) for label in (0, 1)]
    if min(counts) < MIN_HELD_OUT_PER_CLASS:
        raise ConfigError(
            f"{members[-1].path / CONFIG}: only {counts[0]} NORMAL and {counts[1]} PNEUMONIA validation images are "
            f"held out of every member's training (at least {MIN_HELD_OUT_PER_CLASS} of each are needed to fit the "
            "ensemble's temperature); were the members trained on the same data?"
        )
    if len(kept) < len(validation):
        warnings.warn(
            f"the members were trained with different validation splits: the ensemble's temperature and metrics "
            f"use the {len(kept)} of the primary's {len(validation)} validation images that no member trained on",
            stacklevel=2,
        )
    return kept


@declared(EnsembleOptions, "members", "out", "data", "name", "engine", "n_resamples", "progress")
def make_ensemble(
    members: list[str | Path],
    out: str | Path,
    *,
    names: list[str] | None = None,
    data: str | Path | None = DECLARED,
    name: str | None = DECLARED,
    engine: str = DECLARED,
    n_resamples: int = DECLARED,
    seed: int = 0,
    progress: bool = DECLARED,
) -> Ensemble:
    """Build an ensemble bundle in ``out`` from single bundles (the first is the primary): the members
    copied in, the ensemble's temperature fitted on the validation images no member was trained on
    (:func:`held_out_of_every_member`), threshold 0.5 (balanced), validation metrics and the model card."""
    from . import metrics as M
    from .data import load_images
    from .evaluation import head_reports, score
    from .feature_head import Evaluation
    from .inference import Classifier
    from .output import ensure_folder
    from .settings import checked_path

    if not 1 <= len(members) <= MAX_MEMBERS:
        raise ConfigError(f"an ensemble holds 1 to {MAX_MEMBERS} members, not {len(members)}")
    names = list(names) if names else [member_name(m) for m in members]
    if len(names) != len(members):
        raise ConfigError(f"--names gives {len(names)} names for {len(members)} members")
    bundles = []
    for source, member in zip(members, names):
        bundle = load_bundle(source)
        if isinstance(bundle, Ensemble):
            raise ConfigError(f"{bundle.path}: an ensemble cannot be a member of another ensemble")
        if not MEMBER_NAME.fullmatch(member):
            raise ConfigError(f"member name {member!r} is not 1-32 of a-z, 0-9, '_', '-'")
        bundles.append(bundle)
    if len(set(names)) != len(names):
        raise ConfigError(f"member names repeat ({', '.join(names)}): pass --names")
    size = bundles[0].image_size
    for bundle in bundles[1:]:
        if bundle.image_size != size:
            raise ConfigError(
                f"{bundle.path / CONFIG}: image_size {bundle.image_size} differs from the primary's {size}"
            )
    check_same_preprocessing(bundles)
    validation = held_out_of_every_member(bundles, data)
    out = checked_path(out, "--out")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: the ensemble goes into a new or empty folder")
    primary = bundles[0]
    config = {
        "name": name or "ensemble: " + " + ".join(b.name for b in bundles),
        "version": time.strftime("%Y.%m.%d"),
        "image_size": size,
        "threshold": 0.5,
        "threshold_rule": "balanced",
        "temperature": 1.0,
        "training": primary.config.get("training", {}),
        "members": [{"name": n, "config_sha256": sha256_file(b.path / CONFIG)} for n, b in zip(names, bundles)],
    }
    draft = Ensemble(out, config, {}, bundles)
    clf = Classifier(draft, engine, gate=False)
    images, samples, errors = load_images(validation, size, progress, "loading validation")
    if not samples:
        raise ConfigError(f"{data or primary.config.get('training', {}).get('data')}: no readable validation images")
    logits, features = clf.outputs(images)
    y = np.array([s.label for s in samples])
    fitted = M.operating_point(y, logits, "balanced")
    config.update(temperature=fitted.temperature, threshold=fitted.threshold, threshold_rule=fitted.rule)
    draft.config = config
    report = score(
        samples, logits, draft, engine=clf.engine.name, split="validation", n_resamples=n_resamples, seed=seed
    )
    report["unreadable"] = errors
    report["held_out_of"] = "every member's training (the validation images no member was trained on)"
    # the heads' reports that need no refusals made (the gate's needs predictions: none here)
    report.update(head_reports(clf, Evaluation(samples, features, None, n_resamples, seed, "validation")))
    ensure_folder(out)
    metrics = {"validation": {k: v for k, v in report.items() if k != "model"}}
    return write_ensemble(out, config, metrics, list(zip(names, bundles)))


def bundled_models_table() -> str:
    """Two lines per bundled model of :data:`bundle.BUNDLED_MODELS` (one for a second name of the same folder):
    its name and bundle name, then what it is, its size and the accuracy its metrics record (test where
    recorded, else validation)."""
    from .bundle import BUNDLED_MODELS, resolve_model
    from .text import number, printable

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
