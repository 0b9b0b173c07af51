"""The bookkeeping every trainer shares: the run's recorded config, the operating point fitted on validation,
the bundle's config."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pneumoscan.core.errors import ConfigError
from pneumoscan.io.fileio import read_json_object
from pneumoscan.io.images import NORMALIZATION, Preprocessing
from pneumoscan.model.backbones import provenance
from pneumoscan.training.distill import Teacher
from pneumoscan.training.recipe import TrainConfig


def run_config(cfg: TrainConfig, teacher: Teacher | None) -> dict:
    """A run folder's config.json: the settings, and what the teacher was (its digests), if any."""
    return {**cfg.recorded(), **({"teacher_record": teacher.record()} if teacher else {})}


def check_same_teacher(path: Path, teacher: Teacher | None) -> None:
    """A resumed run distils from the very teacher it started with (same config.json digest)."""
    if teacher is None or not path.is_file():
        return
    started = read_json_object(path, "run configuration").get("teacher_record")
    if not isinstance(started, dict) or started.get("config_sha256") != teacher.digest:
        raise ConfigError(f"{teacher.bundle.path}: not the teacher this run started with (config.json digest differs)")


def operating_point(cfg: TrainConfig, val_samples: list, logits: np.ndarray) -> tuple[float, float, str, dict]:
    """Temperature, threshold and its rule fitted on validation logits, and the validation report."""
    from pneumoscan.core import metrics as M

    y_val = np.array([s.label for s in val_samples])
    temperature, threshold, rule = M.fit_operating_point(y_val, logits, cfg.operating_rule, cfg.target_sensitivity)
    p_raw, p_cal = M.sigmoid(logits), M.sigmoid(logits, temperature)
    validation = M.full_report(y_val, p_cal, [s.patient for s in val_samples], threshold, split="validation")
    validation["ece_uncalibrated"] = M.expected_calibration_error(y_val, p_raw)
    validation["at_0.5"] = M.binary_metrics(y_val, p_cal, 0.5)
    return temperature, threshold, rule, validation


def bundle_config(cfg: TrainConfig, hidden: int, threshold: float, rule: str, temperature: float, training: dict):
    """The config.json of a trained bundle (save_bundle adds format, digests and files)."""
    return {
        "name": f"pneumoscan-{cfg.backbone}-{cfg.image_size}",
        "version": time.strftime("%Y.%m.%d"),
        "backbone": cfg.backbone,
        "pretrained": provenance(cfg.backbone) if cfg.weights == "imagenet" else {"backbone": cfg.backbone},
        "image_size": cfg.image_size,
        "dropout": cfg.dropout,
        "hidden": hidden,
        "normalization": NORMALIZATION,
        "preprocessing": Preprocessing(cfg.image_size).record(),  # what load_images made of every image
        "threshold": threshold,
        "threshold_rule": rule,
        "temperature": temperature,
        "training": training,
    }
