"""What a model bundle may hold: its file names and their size limits (:func:`bundle_file`), the config.json
schema and its validation (types, ranges, the sha256 of every file that can change an answer), and
metrics.json's validation. A bundle comes from anywhere, so each check says in one line what is wrong.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from pneumoscan.core.errors import ConfigError
from pneumoscan.core.labels import CLASSES
from pneumoscan.core.metrics import CI_METRICS
from pneumoscan.io.fileio import MAX_JSON_BYTES
from pneumoscan.io.images import RESAMPLING
from pneumoscan.model.backbones import BACKBONES, HEAD
from pneumoscan.model.heads.registry import HEADS, head_files
from pneumoscan.model.quantization import check_record

FORMAT = "pneumoscan-bundle/1"
ENSEMBLE_FORMAT = "pneumoscan-ensemble/1"  # an ensemble of single bundles (ensemble.py)
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
METRICS = "metrics.json"
CARD = "MODEL_CARD.md"
ONNX = "model.onnx"
ONNX_INT8 = "model.int8.onnx"
CURVES = "training_curves.png"
ONNX_INPUT, ONNX_OUTPUT = "image", "logit"  # an exported graph: uint8 (N, 1, S, S) in, logits (N,) out,
ONNX_FEATURES = "features"  # and the pooled features (N, F) that the input gate and the subtype head read,
ONNX_FEATURE_MAP = "feature_map"  # and the last feature map (N, F, h, w) they pool, for Grad-CAM without autograd
GATE = HEADS["gate"].filename  # the input gate (gate.py)
SUBTYPE = HEADS["subtype"].filename  # the bacterial/viral head (subtype.py)
ONNX_FILES = (ONNX, ONNX_INT8)
HEAD_FILES = head_files()  # one file per feature head (feature_heads.HEADS)
ANSWER_FILES = (*ONNX_FILES, *HEAD_FILES)  # besides the weights, the files that can change an answer
EXTRA_FILES = (*ANSWER_FILES, CURVES)  # every other file a bundle may hold
MAX_MODEL_BYTES = 1024 * 2**20  # weights and ONNX models (the shipped ones are 4-17 MB)
# The largest file of each name a bundle may hold; anything bigger is refused before it is read.
MAX_FILE_BYTES = {
    CONFIG: MAX_JSON_BYTES,
    METRICS: MAX_JSON_BYTES,
    CARD: 2**20,
    WEIGHTS: MAX_MODEL_BYTES,
    ONNX: MAX_MODEL_BYTES,
    ONNX_INT8: MAX_MODEL_BYTES,
    **{head.filename: head.max_bytes for head in HEADS.values()},
    CURVES: 16 * 2**20,
}

# key: (types, required). What a single bundle and an ensemble both hold (validate_operating_config checks them)
OPERATING_SCHEMA = {
    "format": (str, True),
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
_SCHEMA = {
    **OPERATING_SCHEMA,
    "backbone": (str, True),
    "weights_sha256": (str, True),
    "files": (dict, False),
    "dropout": ((int, float), False),
    "hidden": (int, False),
    "normalization": (dict, False),
    "int8": (dict, False),  # the int8 model measured against fp32 on validation films (quantization.py)
    "adaptation": (dict, False),  # the site's films its batch-norm statistics were re-estimated on (adapt.py)
    "pretrained": (dict, False),  # where the backbone's pretrained weights came from (backbones.provenance)
    "weights_scope": (str, False),  # "network" (default) or "head": the backbone comes from the registry
    "preprocessing": (dict, False),  # how a film becomes the input (images.Preprocessing); absent: resize only
}
WEIGHTS_SCOPES = ("network", "head")
_CALIBRATION_SCHEMA = {
    "source": str,
    "source_threshold": (int, float),
    "source_temperature": (int, float),
    "data": str,
    "images": int,
    "patients": int,
}
_ADAPTATION_SCHEMA = {
    "data": str,
    "films": int,
    "films_sha256": str,
    "date": str,
    "source": str,
    "source_version": str,
    "source_weights_sha256": str,
}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def bundle_file(folder: Path, name: str) -> Path | None:
    """``folder / name`` if the bundle holds that file, None if it does not. A bundle's files must be
    regular files inside it, within their size limit (:data:`MAX_FILE_BYTES`): a symbolic link (which
    could point at a private file or at /dev/zero), a FIFO, a device or a folder is refused with one
    line, before anything is read."""
    path = folder / name
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISLNK(info.st_mode):
        raise ConfigError(f"{path}: is a symbolic link; a bundle's files must be regular files inside it")
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{path}: not a regular file")
    limit = MAX_FILE_BYTES[name]
    if info.st_size > limit:
        raise ConfigError(f"{path}: {info.st_size / 2**20:.1f} MB, over the {limit / 2**20:.0f} MB limit for {name}")
    return path


def check_schema(config: dict, schema: dict, where: str) -> None:
    """Every required key of ``schema`` (key: (types, required)) present, and every known key of its type."""
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: config.json must hold a JSON object")
    for key, (types, required) in schema.items():
        if key not in config:
            if required:
                raise ConfigError(f"{where}: config.json lacks '{key}'")
            continue
        if not isinstance(config[key], types) or isinstance(config[key], bool):
            raise ConfigError(f"{where}: config.json '{key}' has the wrong type ({type(config[key]).__name__})")


def validate_config(config: dict, where: str) -> None:
    """Check ``config`` against the bundle schema, ranges included; one line naming the first problem.
    A config that passes here cannot fail later on first use."""
    from pneumoscan.io.images import NORMALIZATION

    check_schema(config, _SCHEMA, where)
    if config["format"] != FORMAT:
        raise ConfigError(f"{where}: unsupported bundle format {config['format']!r} (expected {FORMAT})")
    if config["backbone"] not in BACKBONES:
        raise ConfigError(f"{where}: unknown backbone {config['backbone']!r} (expected one of {', '.join(BACKBONES)})")
    if not 0 <= config.get("dropout", HEAD["dropout"]) < 1:
        raise ConfigError(f"{where}: dropout {config['dropout']} is outside [0, 1)")
    if not 1 <= config.get("hidden", HEAD["hidden"]) <= 4096:
        raise ConfigError(f"{where}: hidden {config['hidden']} is outside 1..4096")
    if config.get("normalization", NORMALIZATION) != NORMALIZATION:
        raise ConfigError(f"{where}: normalization differs from the one the model applies ({NORMALIZATION})")
    if not _SHA256.fullmatch(config["weights_sha256"]):
        raise ConfigError(f"{where}: weights_sha256 is not a sha256 hex digest")
    files = config.get("files", {})
    for name, digest in files.items():
        if name not in ANSWER_FILES or not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise ConfigError(f"{where}: config.json 'files' may only map {', '.join(ANSWER_FILES)} to sha256 digests")
    pretrained = config.get("pretrained", {})
    if not all(isinstance(v, str) and len(v) <= 300 for v in pretrained.values()) or len(pretrained) > 16:
        raise ConfigError(f"{where}: config.json 'pretrained' must map at most 16 keys to short strings")
    if config.get("weights_scope", "network") not in WEIGHTS_SCOPES:
        raise ConfigError(f"{where}: config.json 'weights_scope' must be one of {', '.join(WEIGHTS_SCOPES)}")
    if config.get("weights_scope") == "head" and not _SHA256.fullmatch(pretrained.get("sha256", "")):
        raise ConfigError(f"{where}: a head-only bundle must pin its backbone's weights ('pretrained.sha256')")
    if "int8" in config:
        check_record(config["int8"], where)
    validate_preprocessing(config.get("preprocessing"), where)
    validate_operating_config(config, where)


def validate_preprocessing(recorded: dict | None, where: str) -> None:
    """config.json "preprocessing": exactly a known resampling kernel and a JPEG quality of 1-95, or null."""
    if recorded is None:
        return
    quality = recorded.get("jpeg_quality")
    if (
        set(recorded) != {"resample", "jpeg_quality"}
        or recorded.get("resample") not in RESAMPLING
        or not (quality is None or (type(quality) is int and 1 <= quality <= 95))
    ):
        raise ConfigError(
            f"{where}: config.json 'preprocessing' must be {{\"resample\": one of {', '.join(RESAMPLING)}, "
            '"jpeg_quality": an integer 1-95 or null}'
        )


def validate_operating_config(config: dict, where: str) -> None:
    """The checks a single bundle and an ensemble share: image size, classes, operating point, texts,
    training summary and site calibration (types already checked by :func:`check_schema`)."""
    if not 32 <= config["image_size"] <= 1024:
        raise ConfigError(f"{where}: image_size {config['image_size']} is outside 32..1024")
    if not 0 < config["threshold"] < 1:
        raise ConfigError(f"{where}: threshold {config['threshold']} is not a probability in (0, 1)")
    if not 1e-3 <= config["temperature"] <= 1e3:
        raise ConfigError(f"{where}: temperature {config['temperature']} is outside 0.001..1000")
    if list(config["class_names"]) != list(CLASSES):
        raise ConfigError(f"{where}: class_names must be {list(CLASSES)}")
    for key in ("name", "version", "threshold_rule", "notes"):
        if len(config.get(key, "")) > (20_000 if key == "notes" else 200):
            raise ConfigError(f"{where}: config.json '{key}' is too long")
    for part in ("train", "validation", "recipe"):
        if not isinstance(config.get("training", {}).get(part, {}), dict):
            raise ConfigError(f"{where}: config.json 'training.{part}' must be an object")
    site = config.get("calibration")
    if site is not None:
        for key, types in _CALIBRATION_SCHEMA.items():
            if not isinstance(site.get(key), types) or isinstance(site.get(key), bool):
                raise ConfigError(f"{where}: config.json 'calibration.{key}' is missing or has the wrong type")
    adapted = config.get("adaptation")
    if adapted is not None:
        for key, types in _ADAPTATION_SCHEMA.items():
            if not isinstance(adapted.get(key), types) or isinstance(adapted.get(key), bool):
                raise ConfigError(f"{where}: config.json 'adaptation.{key}' is missing or has the wrong type")
            if types is str and len(adapted[key]) > 200:
                raise ConfigError(f"{where}: config.json 'adaptation.{key}' is too long")


_METRIC_NUMBERS = (*CI_METRICS, "ece", "threshold")


_NESTED_REPORTS = ("at_0.5", *HEADS, "cross_fit", "previous_operating_point")  # heads: their validation reports


def validate_metrics(metrics: dict, where: str, prefix: str = "") -> None:
    """metrics.json: an object of reports (one per split) whose headline numbers are numbers or null;
    the reports nested in them (at 0.5, subtype, cross-fitted) likewise."""
    for split, report in metrics.items():
        if not isinstance(report, dict):
            raise ConfigError(f"{where}: metrics.json '{prefix}{split}' must be an object")
        validate_metrics({k: report[k] for k in _NESTED_REPORTS if k in report}, where, f"{prefix}{split}.")
        split = prefix + split
        for key in ("n", "n_normal", "n_pneumonia", "n_bacterial", "n_viral", "patients"):
            if key in report and (not isinstance(report[key], int) or isinstance(report[key], bool)):
                raise ConfigError(f"{where}: metrics.json '{split}.{key}' must be a whole number")
        for key in _METRIC_NUMBERS:
            value = report.get(key)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                raise ConfigError(f"{where}: metrics.json '{split}.{key}' must be a number or null")
        ci = report.get("ci95", {})
        if not isinstance(ci, dict) or not all(
            v is None or (isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v))
            for v in ci.values()
        ):
            raise ConfigError(f"{where}: metrics.json '{split}.ci95' must map metrics to [low, high]")
        cm = report.get("confusion_matrix")
        if cm is not None and not (
            isinstance(cm, list)
            and len(cm) == 2
            and all(isinstance(row, list) and len(row) == 2 and all(isinstance(x, int) for x in row) for row in cm)
        ):
            raise ConfigError(f"{where}: metrics.json '{split}.confusion_matrix' must be [[TN, FP], [FN, TP]]")
