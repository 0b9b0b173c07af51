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
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pneumoscan.core.errors import ConfigError
from pneumoscan.io.fileio import MAX_JSON_BYTES, parse_json_object, read_json_object
from pneumoscan.model.backbones import sha256_file
from pneumoscan.model.bundle import Bundle, commit_bundle, load_single, stamped, write_bundle
from pneumoscan.model.schema import (
    CONFIG,
    CURVES,
    ENSEMBLE_FORMAT,
    FORMAT,
    METRICS,
    OPERATING_SCHEMA,
    WEIGHTS,
    bundle_file,
    check_schema,
    validate_metrics,
    validate_operating_config,
)

MEMBERS = "members"  # the folder that holds one folder per member
MAX_MEMBERS = 8  # a deep ensemble of five to eight seeds; each member costs its network time
MEMBER_NAME = re.compile(r"[a-z0-9_-]{1,32}")  # a member's folder name: never a path

_ENSEMBLE_SCHEMA = {**OPERATING_SCHEMA, "members": (list, True)}


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
    metrics.json and the model card (:func:`~pneumoscan.model.bundle.commit_bundle`)."""
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
        **stamped(config, ENSEMBLE_FORMAT),
        "members": [{"name": n, "config_sha256": sha256_file(m.path / CONFIG)} for n, m in written],
    }
    members = [m for _, m in written]
    return commit_bundle(path, config, metrics, validate_ensemble_config, lambda *args: Ensemble(*args, members))


def _copy_member(member: Bundle, target: Path) -> Bundle:
    files = {name: member.path / name for name in member.config.get("files", {})}
    if (member.path / CURVES).is_file() and not (member.path / CURVES).is_symlink():
        files[CURVES] = member.path / CURVES
    return write_bundle(target, member.config, member.metrics, weights=member.path / WEIGHTS, files=files)
