"""The model bundle: a folder with weights (safetensors), config, metrics and model card.

``model.safetensors``, ``config.json``, ``metrics.json``, ``MODEL_CARD.md`` and optionally
``model.onnx`` / ``model.int8.onnx``. The config records the sha256 of the weights, which is
checked at every load: a tampered or truncated bundle stops with a clear message.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .errors import ConfigError
from .metrics import sigmoid

FORMAT = "pneumoscan-bundle/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
METRICS = "metrics.json"
CARD = "MODEL_CARD.md"
ONNX = "model.onnx"
ONNX_INT8 = "model.int8.onnx"

# key: (types, required)
_SCHEMA = {
    "format": (str, True),
    "backbone": (str, True),
    "image_size": (int, True),
    "class_names": (list, True),
    "threshold": ((int, float), True),
    "temperature": ((int, float), True),
    "weights_sha256": (str, True),
    "dropout": ((int, float), False),
    "name": (str, False),
    "version": (str, False),
    "normalization": (dict, False),
    "threshold_rule": (str, False),
    "training": (dict, False),
    "pneumoscan_version": (str, False),
    "notes": (str, False),
    "calibration": (dict, False),
}


def default_bundle_path() -> Path:
    return Path(__file__).parent / "default_model"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def validate_config(config: dict, where: str) -> None:
    """Check ``config`` against the bundle schema; one line naming the first problem."""
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: config.json must hold a JSON object")
    for key, (types, required) in _SCHEMA.items():
        if key not in config:
            if required:
                raise ConfigError(f"{where}: config.json lacks '{key}'")
            continue
        if not isinstance(config[key], types) or isinstance(config[key], bool):
            raise ConfigError(f"{where}: config.json '{key}' has the wrong type ({type(config[key]).__name__})")
    if config["format"] != FORMAT:
        raise ConfigError(f"{where}: unsupported bundle format {config['format']!r} (expected {FORMAT})")
    if not 32 <= config["image_size"] <= 1024:
        raise ConfigError(f"{where}: image_size {config['image_size']} is outside 32..1024")
    if not 0 < config["threshold"] < 1:
        raise ConfigError(f"{where}: threshold {config['threshold']} is not a probability in (0, 1)")
    if not config["temperature"] > 0:
        raise ConfigError(f"{where}: temperature must be positive")
    if config["class_names"] != ["NORMAL", "PNEUMONIA"]:
        raise ConfigError(f"{where}: class_names must be ['NORMAL', 'PNEUMONIA']")


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
    def threshold(self) -> float:
        return float(self.config["threshold"])

    @property
    def temperature(self) -> float:
        return float(self.config["temperature"])

    @property
    def operating_point_source(self) -> str:
        """Where the threshold and temperature were fitted, in words."""
        site = self.config.get("calibration")
        if site:
            return f"{site['images']} labelled images of {site['data']} (pneumoscan calibrate)"
        return "validation data (patients held out of training), never on test"

    def probabilities(self, logits):
        """Calibrated probabilities of PNEUMONIA from logits (the bundle's temperature applied)."""
        return sigmoid(logits, self.temperature)

    def onnx_path(self, int8: bool = False) -> Path | None:
        path = self.path / (ONNX_INT8 if int8 else ONNX)
        return path if path.is_file() else None

    def load_net(self):
        """The PyTorch network with the bundle's weights, in eval mode."""
        from safetensors.torch import load_file

        from .models import create_model

        net = create_model(self.config["backbone"], weights=None, dropout=float(self.config.get("dropout", 0.2)))
        try:
            state = load_file(str(self.path / WEIGHTS))
            net.load_state_dict(state, strict=True)
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(
                f"{self.path}: weights do not match backbone {self.config['backbone']} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:150]})"
            ) from None
        return net.eval()


def load_bundle(path: str | Path | None = None) -> Bundle:
    """Open and verify a bundle (the packaged default when ``path`` is None)."""
    path = Path(path) if path is not None else default_bundle_path()
    if path.is_file() and path.name == CONFIG:
        path = path.parent
    if not (path / CONFIG).is_file():
        if path == default_bundle_path():
            raise ConfigError(
                "no bundled model in this install; pass --model BUNDLE (a folder made by pneumoscan train)"
            )
        raise ConfigError(f"{path}: not a model bundle (no {CONFIG})")
    try:
        config = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path / CONFIG}: not valid JSON ({exc})") from None
    validate_config(config, str(path))
    weights = path / WEIGHTS
    if not weights.is_file():
        raise ConfigError(f"{path}: {WEIGHTS} is missing")
    if sha256_file(weights) != config["weights_sha256"]:
        raise ConfigError(f"{weights}: sha256 does not match config.json (truncated or tampered weights)")
    _check_weights_metadata(weights, config)
    metrics = {}
    if (path / METRICS).is_file():
        try:
            metrics = json.loads((path / METRICS).read_text())
        except ValueError as exc:
            raise ConfigError(f"{path / METRICS}: not valid JSON ({exc})") from None
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
    atomic_write(path, (json.dumps(data, indent=2, default=_jsonable) + "\n").encode())


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def save_bundle(path: str | Path, net, config: dict, metrics: dict | None = None, card: str | None = None) -> Bundle:
    """Write a bundle: weights first, then the config that vouches for them."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path, prefix=".weights.")
    os.close(fd)
    save_file(state, tmp, metadata={"format": FORMAT, **{k: str(config[k]) for k in _FINGERPRINT}})
    os.chmod(tmp, 0o644)
    os.replace(tmp, path / WEIGHTS)
    config = {
        "format": FORMAT,
        "pneumoscan_version": __version__,
        "class_names": ["NORMAL", "PNEUMONIA"],
        **config,
        "weights_sha256": sha256_file(path / WEIGHTS),
    }
    validate_config(config, str(path))
    write_json(path / CONFIG, config)
    if metrics is not None:
        write_json(path / METRICS, metrics)
    if card is not None:
        atomic_write(path / CARD, card.encode())
    return Bundle(path, config, metrics or {})
