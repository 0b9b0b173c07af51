"""`pneumoscan ensemble`: trained bundles combined into an ensemble bundle, its temperature fitted on validation
films no member trained on."""

from __future__ import annotations

import re
import time
import warnings
from pathlib import Path

import numpy as np

from pneumoscan.core.errors import ConfigError
from pneumoscan.core.options import EnsembleOptions
from pneumoscan.core.settings import DECLARED, declared
from pneumoscan.model.backbones import sha256_file
from pneumoscan.model.bundle import Bundle
from pneumoscan.model.ensemble import MAX_MEMBERS, MEMBER_NAME, Ensemble, check_same_preprocessing, write_ensemble
from pneumoscan.model.schema import CONFIG
from pneumoscan.model.store import load_bundle


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
    from pneumoscan.core import metrics as M
    from pneumoscan.core.settings import checked_path
    from pneumoscan.evaluation.evaluate import head_reports, score
    from pneumoscan.inference.classifier import Classifier
    from pneumoscan.io.dataset import load_images
    from pneumoscan.io.fileio import ensure_folder
    from pneumoscan.model.heads.base import Evaluation

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
