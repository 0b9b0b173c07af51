"""The model bundle: a folder with weights (safetensors), config, metrics and model card.

``model.safetensors``, ``config.json``, ``metrics.json``, ``MODEL_CARD.md`` and optionally
``model.onnx`` / ``model.int8.onnx`` and ``training_curves.png``. Bundles come from anywhere, so
everything in one is hostile until checked: the config records the sha256 of the weights and of
every ONNX model and feature head, checked at every load, and config and metrics are validated (types,
ranges, size, nesting: :mod:`pneumoscan.model.schema`) so that a bundle either loads with one line saying
why not, or works. Files are written atomically and JSON read with bounds (:mod:`pneumoscan.io.fileio`); this
module re-exports the names of both, so ``from pneumoscan.model.bundle import ...`` finds every bundle name.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pneumoscan.core.errors import ConfigError, require_train_extra
from pneumoscan.core.labels import CLASSES
from pneumoscan.core.metrics import sigmoid
from pneumoscan.core.package import __version__
from pneumoscan.io.fileio import atomic_write, read_json_object, write_json
from pneumoscan.io.images import Preprocessing
from pneumoscan.model.backbones import HEAD, sha256_file
from pneumoscan.model.heads.registry import HEADS
from pneumoscan.model.quantization import int8_status
from pneumoscan.model.schema import (
    ANSWER_FILES,
    CARD,
    CONFIG,
    EXTRA_FILES,
    FORMAT,
    MAX_FILE_BYTES,
    METRICS,
    ONNX,
    ONNX_FILES,
    ONNX_INT8,
    WEIGHTS,
    bundle_file,
    validate_config,
    validate_metrics,
)


@dataclass
class Bundle:
    path: Path
    config: dict
    metrics: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.get("name", self.path.name)

    @property
    def version(self) -> str:
        """The bundle's version as recorded ("" where its author recorded none)."""
        return str(self.config.get("version", ""))

    @property
    def image_size(self) -> int:
        return int(self.config["image_size"])

    @property
    def preprocessing(self) -> Preprocessing:
        """How every input becomes this model's input (config.json "preprocessing")."""
        return Preprocessing.of_config(self.config)

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
        if self.config.get("adaptation") and not site:
            return f"{self._fitted_source()}, for the network before adaptation: not validated on this one"
        return self._fitted_source()

    def _fitted_source(self) -> str:
        site = self.config.get("calibration")
        where = (
            f"{site['images']} labelled images of {site['data']} (pneumoscan calibrate)"
            if site
            else "validation data (patients held out of training), never on test"
        )
        unfitted = self.temperature == 1.0  # the fallback where nothing could be fitted (or nothing was)
        if self.config.get("threshold_rule") == "balanced":
            temperature = "temperature 1 (not fitted)" if unfitted else f"temperature fitted on {where}"
            return f"{temperature}; threshold 0.5 by rule (balanced: logit 0)"
        if unfitted:
            return f"threshold fitted on {where}; temperature 1 (not fitted)"
        return f"threshold and temperature fitted on {where}"

    def probabilities(self, logits):
        """Calibrated probabilities of PNEUMONIA from logits (the bundle's temperature applied)."""
        return sigmoid(logits, self.temperature)

    def parameter_count(self) -> int:
        """Trainable values in the weights (batch-norm statistics left out), read from the file's header; a
        head-only bundle adds its pinned backbone's."""
        from safetensors import safe_open

        from pneumoscan.model.backbones import get_backbone

        buffers = ("running_mean", "running_var", "num_batches_tracked")
        with safe_open(str(self.path / WEIGHTS), framework="numpy") as f:
            shapes = [f.get_slice(k).get_shape() for k in f.keys() if not k.endswith(buffers)]
        backbone = get_backbone(self.config["backbone"]).backbone_parameters if self.head_only else 0
        return backbone + int(sum(math.prod(shape) for shape in shapes))

    def training_splits(self, root: str | Path | None = None):
        """The (train, validation) samples this bundle was trained with: its recipe's patient split of
        ``root`` (default: the training data recorded in the bundle)."""
        from pneumoscan.io.dataset import recipe_splits

        root = root or self.config.get("training", {}).get("data")
        if not root:
            raise ConfigError(f"{self.path}: the bundle records no training data; pass its root")
        return recipe_splits(root, self.config.get("training", {}).get("recipe", {}))

    def load_head(self, name: str):
        """The feature head ``name`` (a key of :data:`feature_heads.HEADS`), or None for a bundle without it."""
        head = HEADS[name]
        return head.load(self.path / head.filename) if head.filename in self.config.get("files", {}) else None

    def load_heads(self) -> dict:
        """The feature heads this bundle has, by name, in HEADS order."""
        return {name: head for name in HEADS if (head := self.load_head(name)) is not None}

    def load_gate(self):
        """The input gate (:class:`pneumoscan.model.heads.gate.Gate`), or None for a bundle without one."""
        return self.load_head("gate")

    def load_subtype(self):
        """The bacterial/viral head (:class:`pneumoscan.model.heads.subtype.SubtypeHead`), or None."""
        return self.load_head("subtype")

    def onnx_path(self, int8: bool = False) -> Path | None:
        """The bundle's ONNX model, if it has one recorded (by sha256, checked at load) in config.json. A
        head-only bundle's model.onnx is its int8 model too: its backbone's MatMul weights are int8 already."""
        files = self.config.get("files", {})
        name = ONNX_INT8 if int8 and not (self.head_only and ONNX_INT8 not in files) else ONNX
        return self.path / name if name in files else None

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

    def int8_status(self) -> tuple[bool, str]:
        """(whether it runs its int8 model by default, why in one line): see :mod:`pneumoscan.model.quantization`."""
        return int8_status(self.config)

    @property
    def head_only(self) -> bool:
        """The weights hold only the head; the frozen backbone is the registry's, pinned by sha256."""
        return self.config.get("weights_scope") == "head"

    def load_net(self):
        """The PyTorch network with the bundle's weights, in eval mode (needs the ``train`` extra; a
        head-only bundle also needs its backbone's weights package, checked against the pinned sha256)."""
        require_train_extra("running the model on PyTorch (--engine torch)", ("torch", "timm", "torchvision"))
        from safetensors.torch import load_file

        from pneumoscan.model.networks import create_model

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
        from pneumoscan.model.backbones import get_backbone

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


def dense_head_logits(head: dict[str, np.ndarray], features: np.ndarray) -> np.ndarray:
    """The dense head's logits on pooled features (numpy; dropout off): ``head`` as
    :meth:`Bundle.head_weights` gives it."""
    hidden = np.maximum(features @ head["w1"].T + head["b1"], 0)
    return (hidden @ head["w2"].T + head["b2"])[:, 0]


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
    metrics.json and a model card regenerated from both (:func:`commit_bundle`)."""
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
    config = {**stamped(config, FORMAT), "weights_sha256": sha256_file(path / WEIGHTS)}
    for name in set(recorded) & set(ONNX_FILES):  # their metadata follows the operating point
        if not _onnx_metadata_current(path / name, onnx_metadata(config)):
            before = sha256_file(path / name)
            atomic_write(path / name, with_metadata(path / name, onnx_metadata(config)))
            if config.get("int8", {}).get("sha256") == before:  # the same graph: its measurement still holds
                config["int8"] = {**config["int8"], "sha256": sha256_file(path / name)}
    config["files"] = {name: sha256_file(path / name) for name in recorded}
    return commit_bundle(path, config, metrics, validate_config, Bundle)


def stamped(config: dict, fmt: str) -> dict:
    """A bundle's config.json as written: its format, the code version and the class names first."""
    return {"format": fmt, "pneumoscan_version": __version__, "class_names": list(CLASSES), **config}


def commit_bundle(path: Path, config: dict, metrics: dict | None, validate: Callable, make: Callable) -> Bundle:
    """The last steps of writing any bundle, in the order its integrity rests on: config.json is validated and
    written only after every file it vouches for by sha256 is in place, then metrics.json, then the model card
    regenerated from both. ``make(path, config, metrics)`` builds the bundle object the card is written from."""
    from pneumoscan.model.card import model_card

    validate(config, str(path))
    metrics = metrics or {}
    validate_metrics(metrics, str(path))
    write_json(path / CONFIG, config)
    write_json(path / METRICS, metrics)
    bundle = make(path, config, metrics)
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
