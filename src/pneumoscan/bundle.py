"""The model bundle: a folder with weights (safetensors), config, metrics and model card.

``model.safetensors``, ``config.json``, ``metrics.json``, ``MODEL_CARD.md`` and optionally
``model.onnx`` / ``model.int8.onnx`` and ``training_curves.png``. Bundles come from anywhere, so
everything in one is hostile until checked: the config records the sha256 of the weights and of
every ONNX model, checked at every load, and config and metrics are validated (types, ranges, size,
nesting) so that a bundle either loads with one line saying why not, or works.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .backbones import BACKBONES, HEAD, sha256_file
from .errors import ConfigError, require_train_extra
from .feature_heads import HEADS, head_files
from .labels import CLASSES
from .metrics import CI_METRICS, sigmoid

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
MAX_JSON_BYTES = 4 * 2**20
MAX_JSON_DEPTH = 32
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

# key: (types, required)
_SCHEMA = {
    "format": (str, True),
    "backbone": (str, True),
    "image_size": (int, True),
    "class_names": (list, True),
    "threshold": ((int, float), True),
    "temperature": ((int, float), True),
    "weights_sha256": (str, True),
    "files": (dict, False),
    "dropout": ((int, float), False),
    "hidden": (int, False),
    "name": (str, False),
    "version": (str, False),
    "normalization": (dict, False),
    "threshold_rule": (str, False),
    "training": (dict, False),
    "pneumoscan_version": (str, False),
    "notes": (str, False),
    "calibration": (dict, False),
    "pretrained": (dict, False),  # where the backbone's pretrained weights came from (backbones.provenance)
    "weights_scope": (str, False),  # "network" (default) or "head": the backbone comes from the registry
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
_SHA256 = re.compile(r"[0-9a-f]{64}")


def default_bundle_path() -> Path:
    return Path(__file__).parent / "default_model"


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
    from .images import NORMALIZATION

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
    validate_operating_config(config, where)


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


@dataclass
class Bundle:
    path: Path
    config: dict
    metrics: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.get("name", self.path.name)

    @property
    def image_size(self) -> int:
        return int(self.config["image_size"])

    @property
    def weights_sha256(self) -> str:
        """The digest that names the weights (results files, ledger, reports)."""
        return self.config["weights_sha256"]

    @property
    def backbone(self) -> str:
        return self.config["backbone"]

    @property
    def threshold(self) -> float:
        return float(self.config["threshold"])

    @property
    def temperature(self) -> float:
        return float(self.config["temperature"])

    @property
    def operating_point_source(self) -> str:
        """Where the threshold and temperature come from, in words."""
        site = self.config.get("calibration")
        where = (
            f"{site['images']} labelled images of {site['data']} (pneumoscan calibrate)"
            if site
            else "validation data (patients held out of training), never on test"
        )
        if self.config.get("threshold_rule") == "balanced":
            return f"temperature fitted on {where}; threshold 0.5 by rule (balanced: logit 0)"
        return f"threshold and temperature fitted on {where}"

    def probabilities(self, logits):
        """Calibrated probabilities of PNEUMONIA from logits (the bundle's temperature applied)."""
        return sigmoid(logits, self.temperature)

    def parameter_count(self) -> int:
        """Trainable values in the weights (batch-norm statistics left out), read from the file's header; a
        head-only bundle adds its pinned backbone's."""
        from safetensors import safe_open

        from .backbones import get_backbone

        buffers = ("running_mean", "running_var", "num_batches_tracked")
        with safe_open(str(self.path / WEIGHTS), framework="numpy") as f:
            shapes = [f.get_slice(k).get_shape() for k in f.keys() if not k.endswith(buffers)]
        backbone = get_backbone(self.config["backbone"]).backbone_parameters if self.head_only else 0
        return backbone + int(sum(math.prod(shape) for shape in shapes))

    def training_splits(self, root: str | Path | None = None):
        """The (train, validation) samples this bundle was trained with: its recipe's patient split of
        ``root`` (default: the training data recorded in the bundle)."""
        from .data import training_splits

        recipe = self.config.get("training", {}).get("recipe", {})
        root = root or self.config.get("training", {}).get("data")
        if not root:
            raise ConfigError(f"{self.path}: the bundle records no training data; pass its root")
        return training_splits(
            root, recipe.get("val_source", "patients"), recipe.get("val_fraction", 0.1), recipe.get("seed", 0)
        )

    def load_head(self, name: str):
        """The feature head ``name`` (a key of :data:`feature_heads.HEADS`), or None for a bundle without it."""
        head = HEADS[name]
        return head.load(self.path / head.filename) if head.filename in self.config.get("files", {}) else None

    def load_heads(self) -> dict:
        """The feature heads this bundle has, by name, in HEADS order."""
        return {name: head for name in HEADS if (head := self.load_head(name)) is not None}

    def load_gate(self):
        """The input gate (:class:`pneumoscan.gate.Gate`), or None for a bundle without one."""
        return self.load_head("gate")

    def load_subtype(self):
        """The bacterial/viral head (:class:`pneumoscan.subtype.SubtypeHead`), or None."""
        return self.load_head("subtype")

    def onnx_path(self, int8: bool = False) -> Path | None:
        """The bundle's ONNX model, if it has one recorded (by sha256, checked at load) in config.json."""
        name = ONNX_INT8 if int8 else ONNX
        return self.path / name if name in self.config.get("files", {}) else None

    def head_weights(self) -> dict[str, np.ndarray] | None:
        """The dense head's weights as float64 numpy arrays (``w1`` (H, F), ``b1``, ``w2`` (1, H), ``b2``),
        read without PyTorch; None where the weights hold no such head."""
        from safetensors import safe_open

        names = {"w1": "head.0.weight", "b1": "head.0.bias", "w2": "head.3.weight", "b2": "head.3.bias"}
        with safe_open(str(self.path / WEIGHTS), framework="numpy") as f:
            if not set(names.values()) <= set(f.keys()):
                return None
            head = {k: f.get_tensor(v).astype(np.float64) for k, v in names.items()}
        hidden = head["w1"].shape[0]
        if head["b1"].shape != (hidden,) or head["w2"].shape != (1, hidden) or head["b2"].shape != (1,):
            return None
        return head

    @property
    def head_only(self) -> bool:
        """The weights hold only the head; the frozen backbone is the registry's, pinned by sha256."""
        return self.config.get("weights_scope") == "head"

    def load_net(self):
        """The PyTorch network with the bundle's weights, in eval mode (needs the ``train`` extra; a
        head-only bundle also needs its backbone's weights package, checked against the pinned sha256)."""
        require_train_extra("running the model on PyTorch (--engine torch)", ("torch", "timm", "torchvision"))
        from safetensors.torch import load_file

        from .models import create_model

        if self.head_only:
            self.check_pinned_backbone()
        net = create_model(
            self.config["backbone"],
            weights="imagenet" if self.head_only else None,
            dropout=float(self.config.get("dropout", HEAD["dropout"])),
            hidden=int(self.config.get("hidden", HEAD["hidden"])),
            image_size=self.image_size,
        )
        try:
            state = load_file(str(self.path / WEIGHTS))
            if self.head_only:
                if not all(k.startswith("head.") for k in state):
                    raise ValueError("a head-only bundle's weights must all be head.* tensors")
                net.head.load_state_dict({k.removeprefix("head."): v for k, v in state.items()}, strict=True)
            else:
                net.load_state_dict(state, strict=True)
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(
                f"{self.path}: weights do not match backbone {self.config['backbone']} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:150]})"
            ) from None
        return net.eval()

    def check_pinned_backbone(self) -> None:
        """A head-only bundle's head fits only the backbone weights it was fitted on: the registry's
        weights must be the ones the bundle pins."""
        from .backbones import get_backbone

        source = get_backbone(self.config["backbone"]).weights
        pinned = self.config.get("pretrained", {}).get("sha256")
        if source is None or source.sha256 != pinned:
            raise ConfigError(
                f"{self.path}: its head was fitted on {self.config['backbone']} weights with sha256 {pinned}, "
                f"not the ones this install's backbone registry provides"
            )

    def write_copy(self, path: str | Path, config: dict, metrics: dict) -> Bundle:
        """This bundle with ``config`` and ``metrics`` written to ``path`` (its own folder included): the
        weights and every file config.json records are carried over unchanged."""
        carried = {name: self.path / name for name in self.config.get("files", {})}
        return write_bundle(path, config, metrics, weights=self.path / WEIGHTS, files=carried)


# Models that ship inside the package, by name (--model NAME): the folder under src/pneumoscan/ that
# holds each. A name is looked up only when no file or folder of that name exists (a path wins).
BUNDLED_MODELS = {
    "default": "default_model",  # the most accurate model: an ensemble of EfficientNet-Lite0 and DINOv2
    "fast": "default_model/members/fast",  # the fastest: the ensemble's EfficientNet-Lite0 member alone
}


def resolve_model(path: str | Path | None) -> Path:
    """The folder ``--model`` means: the packaged default for None; an existing path as given; else a
    bundled model's name (:data:`BUNDLED_MODELS`); else the path as given (its loader says what is wrong)."""
    from .settings import checked_path

    if path is None:
        return default_bundle_path()
    raw = os.fspath(checked_path(path, "--model")) if isinstance(path, Path) else str(path)
    if raw in BUNDLED_MODELS and not os.path.lexists(raw):  # the name as typed: "./fast" is always a path
        return Path(__file__).parent / BUNDLED_MODELS[raw]
    return checked_path(path, "--model")


def load_bundle(path: str | Path | None = None) -> Bundle:
    """Open and verify a bundle (the packaged default when ``path`` is None): config and metrics
    validated, and the sha256 of the weights and of every recorded ONNX model checked."""
    path = resolve_model(path)
    if path.is_file() and path.name == CONFIG:
        path = path.parent
    if not path.is_dir() or not os.path.lexists(path / CONFIG):
        if path.resolve().is_relative_to(Path(__file__).parent.resolve()):
            raise ConfigError(
                f"no bundled model in this install ({path} is missing); "
                "pass --model BUNDLE (a folder made by pneumoscan train)"
            )
        hint = "" if os.path.lexists(path) else f" and not a bundled model's name ({', '.join(BUNDLED_MODELS)})"
        raise ConfigError(f"{path}: not a model bundle (no {CONFIG}){hint}")
    present = {name for name in MAX_FILE_BYTES if bundle_file(path, name) is not None}  # every file checked
    config = read_json_object(path / CONFIG, "config.json")
    if config.get("format") == ENSEMBLE_FORMAT:
        from .ensemble import load_ensemble

        return load_ensemble(path, config)
    return load_single(path, config, present)


def load_single(path: Path, config: dict, present: set[str] | None = None) -> Bundle:
    """A single model's bundle from its folder and its parsed config.json (:func:`load_bundle`'s checks)."""
    if present is None:
        present = {name for name in MAX_FILE_BYTES if bundle_file(path, name) is not None}
    validate_config(config, str(path))
    weights = path / WEIGHTS
    if WEIGHTS not in present:
        raise ConfigError(f"{path}: {WEIGHTS} is missing")
    if sha256_file(weights) != config["weights_sha256"]:
        raise ConfigError(f"{weights}: sha256 does not match config.json (truncated or tampered weights)")
    _check_weights_metadata(weights, config)
    for name, digest in config.get("files", {}).items():
        if name not in present:
            raise ConfigError(f"{path}: {name} is recorded in config.json but missing")
        if sha256_file(path / name) != digest:
            raise ConfigError(f"{path / name}: sha256 does not match config.json (swapped or tampered file)")
    for name in ANSWER_FILES:
        if name in present and name not in config.get("files", {}):  # never used unvouched for
            warnings.warn(f"{path / name} is not recorded in config.json and will not be used", stacklevel=2)
    metrics = read_json_object(path / METRICS, "metrics.json") if METRICS in present else {}
    validate_metrics(metrics, str(path))
    return Bundle(path, config, metrics)


_FINGERPRINT = ("backbone", "image_size")  # written into the weights file, covered by its sha256


def _check_weights_metadata(weights: Path, config: dict) -> None:
    """The weights record what they were trained as; config.json must agree."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="numpy") as f:
            recorded = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"{weights}: not a readable safetensors file ({exc})") from None
    for key in _FINGERPRINT:
        if key in recorded and recorded[key] != str(config[key]):
            raise ConfigError(
                f"{weights.parent}: config.json says {key} {config[key]!r} but the weights were "
                f"trained with {recorded[key]!r}"
            )


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


def onnx_metadata(config: dict) -> dict[str, str]:
    """What an exported ONNX file says about itself: the weights it came from and the bundle's
    operating point (the config stays authoritative; this is for readers of the file alone)."""
    return {
        "pneumoscan_weights_sha256": config["weights_sha256"],
        "pneumoscan_image_size": str(config["image_size"]),
        "pneumoscan_threshold": repr(float(config["threshold"])),
        "pneumoscan_temperature": repr(float(config["temperature"])),
    }


def with_metadata(model_path: Path, metadata: dict[str, str]) -> bytes:
    """An ONNX file's bytes with ``metadata`` set in its metadata_props."""
    import onnx

    model = onnx.load(str(model_path))
    kept = [p for p in model.metadata_props if p.key not in metadata]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    return model.SerializeToString()


def _onnx_metadata_current(path: Path, metadata: dict[str, str]) -> bool:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    recorded = {p.key: p.value for p in model.metadata_props}
    return all(recorded.get(k) == v for k, v in metadata.items())


def write_bundle(
    path: str | Path,
    config: dict,
    metrics: dict | None = None,
    *,
    weights: Path,
    files: dict[str, bytes | Path] | None = None,
) -> Bundle:
    """The one way a bundle is written. ``weights`` (a safetensors file, copied unless already in
    place) and ``files`` (ONNX models, training curves: name -> bytes or a file to copy) are written
    atomically; ONNX models already in the folder and recorded in ``config`` stay. config.json, which
    vouches for every file that can change an answer by its sha256, is written after them, then
    metrics.json and a model card regenerated from both."""
    from .model_card import model_card

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if Path(weights).resolve() != (path / WEIGHTS).resolve():
        atomic_write(path / WEIGHTS, Path(weights))
    for name, data in (files or {}).items():
        if name not in EXTRA_FILES:
            raise ValueError(f"a bundle holds no file named {name!r}")
        atomic_write(path / name, data)
    wanted = {*config.get("files", {}), *(files or {})}
    recorded = [n for n in ANSWER_FILES if n in wanted and (path / n).is_file()]
    config = {
        "format": FORMAT,
        "pneumoscan_version": __version__,
        "class_names": list(CLASSES),
        **config,
        "weights_sha256": sha256_file(path / WEIGHTS),
    }
    for name in set(recorded) & set(ONNX_FILES):  # their metadata follows the operating point
        if not _onnx_metadata_current(path / name, onnx_metadata(config)):
            atomic_write(path / name, with_metadata(path / name, onnx_metadata(config)))
    config["files"] = {name: sha256_file(path / name) for name in recorded}
    validate_config(config, str(path))
    metrics = metrics or {}
    validate_metrics(metrics, str(path))
    write_json(path / CONFIG, config)
    write_json(path / METRICS, metrics)
    bundle = Bundle(path, config, metrics)
    atomic_write(path / CARD, model_card(bundle).encode())
    return bundle


def save_bundle(
    path: str | Path, net, config: dict, metrics: dict | None = None, extras: dict | None = None, half: bool = False
) -> Bundle:
    """A bundle from a trained network: its weights (with backbone and image size in their metadata);
    ``half`` stores floating-point tensors as float16 (a large frozen backbone under the per-file limit;
    they load back into float32)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    if config.get("weights_scope") == "head":  # the frozen backbone is pinned, not stored
        state = {k: v for k, v in state.items() if k.startswith("head.")}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    with tempfile.TemporaryDirectory(dir=path) as tmp:
        weights = Path(tmp) / WEIGHTS
        save_file(state, str(weights), metadata={"format": FORMAT, **{k: str(config[k]) for k in _FINGERPRINT}})
        return write_bundle(path, config, metrics, weights=weights, files=extras)
