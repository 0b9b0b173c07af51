"""The engines that run a bundle's network on prepared images: ONNX Runtime, PyTorch, an ensemble's members."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from pneumoscan.core.errors import ConfigError
from pneumoscan.core.options import ENGINES
from pneumoscan.model.bundle import Bundle
from pneumoscan.model.schema import ONNX_FEATURE_MAP, ONNX_FEATURES, ONNX_INPUT, ONNX_OUTPUT


class TorchEngine:
    name = "torch"

    def __init__(self, bundle: Bundle):
        self.net = bundle.load_net()

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits ``(N,)`` and pooled features ``(N, F)``."""
        from pneumoscan.model.networks import predict_outputs

        return predict_outputs(self.net, images, batch_size=max(1, len(images)))


class OnnxEngine:
    name = "onnx"

    def __init__(self, path: Path, bundle: Bundle, threads: int | None = None, name: str | None = None):
        """``name``: the engine's name (onnx, onnx-int8); by default from the file's name."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"{path}: not a loadable ONNX model ({str(exc).splitlines()[0][:150]})") from None
        _check_onnx_contract(self.session, path, bundle)
        self.name = name or ("onnx-int8" if path.name.endswith(".int8.onnx") else "onnx")
        outputs = {o.name: o for o in self.session.get_outputs()}
        self.has_feature_map = ONNX_FEATURE_MAP in outputs and len(outputs[ONNX_FEATURE_MAP].shape) == 4

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits ``(N,)`` and pooled features ``(N, F)``."""
        batch = np.ascontiguousarray(images)[:, None]
        logits, features = self.session.run([ONNX_OUTPUT, ONNX_FEATURES], {ONNX_INPUT: batch})
        return logits, features


def _check_onnx_contract(session, path: Path, bundle: Bundle) -> None:
    """An ONNX model is used only if it was exported from this bundle's weights and takes and gives
    what the export makes: uint8 ``(N, 1, S, S)`` in, one logit per image out."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    size = bundle.image_size
    if len(inputs) != 1 or inputs[0].name != ONNX_INPUT or inputs[0].type != "tensor(uint8)":
        raise ConfigError(f"{path}: ONNX model must take one uint8 input named '{ONNX_INPUT}'")
    if list(inputs[0].shape[1:]) != [1, size, size]:
        raise ConfigError(f"{path}: ONNX input shape {inputs[0].shape} does not match (N, 1, {size}, {size})")
    shapes = {o.name: (o.type, len(o.shape)) for o in outputs}
    if shapes.get(ONNX_OUTPUT) != ("tensor(float)", 1) or shapes.get(ONNX_FEATURES) != ("tensor(float)", 2):
        raise ConfigError(
            f"{path}: ONNX model must give float outputs '{ONNX_OUTPUT}' (N,) and '{ONNX_FEATURES}' (N, F)"
        )
    recorded = session.get_modelmeta().custom_metadata_map.get("pneumoscan_weights_sha256")
    if recorded != bundle.config["weights_sha256"]:
        raise ConfigError(f"{path}: ONNX model was not exported from this bundle's weights (metadata sha256 differs)")


def cache_dir() -> Path:
    """Where ONNX exports of bundles that carry none are kept: ``$PNEUMOSCAN_CACHE`` or ``~/.cache/pneumoscan``."""
    return Path(os.environ.get("PNEUMOSCAN_CACHE", Path.home() / ".cache" / "pneumoscan"))


def onnx_cache_path(bundle: Bundle) -> Path:
    """Where the cache keeps a bundle's fp32 export: keyed by the weights' sha256 and the image size
    (the export holds logits only, so every calibration of the same weights shares it)."""
    return cache_dir() / f"{bundle.config['weights_sha256']}-{bundle.image_size}.onnx"


def _trusted_cache_file(path: Path) -> bool:
    """A cached export is used only if this user owns it and nobody else can write it or its folder;
    its origin is then checked like any ONNX model (:func:`_check_onnx_contract`)."""
    try:
        for item in (path, path.parent):
            info = item.stat()
            if info.st_uid != os.getuid() or info.st_mode & 0o022:
                return False
    except OSError:
        return False
    return path.is_file()


def cached_onnx(bundle: Bundle, fresh: bool = False) -> Path | None:
    """The bundle's fp32 ONNX model, exported once into the cache when the bundle carries none
    (again with ``fresh``); None where the cache cannot be written. PyTorch is imported only to export."""
    path = onnx_cache_path(bundle)
    if _trusted_cache_file(path) and not fresh:
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path.parent, path.parent.stat().st_mode & ~0o022)
        from pneumoscan.model.onnx_export import export_onnx

        return export_onnx(bundle, path)
    except OSError:
        return None


class EnsembleEngine:
    """The members' engines on the same prepared images: the mean of their temperature-scaled logits,
    and the primary member's pooled features (which the gate and the subtype head were fitted on)."""

    def __init__(self, bundle, engine: str = "auto", int8: bool | None = False):
        self.members = [member_engine(m, n, engine, int8) for n, m in zip(bundle.member_names, bundle.members)]
        self.temperatures = bundle.member_temperatures()
        self.name = "+".join(e.name for e in self.members)  # one engine name per member, in order
        self.features_from = self.members[0].name  # the primary's engine: the gate's limit is chosen by it

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Combined logits ``(N,)`` (mean of ``logit_i / T_i``) and the primary's features ``(N, F)``."""
        outputs = [e.run(images) for e in self.members]
        logits = np.mean([np.asarray(o[0], np.float64) / t for o, t in zip(outputs, self.temperatures)], axis=0)
        return logits, outputs[0][1]


def member_engine(bundle: Bundle, name: str, engine: str, int8: bool | None):
    """An ensemble member's engine for the ensemble's ``engine`` and ``int8`` choice (None: the member's
    own, :meth:`Bundle.int8_status`). A member without an
    int8 model runs its fp32 model under ``int8``. A member with only an int8 model (a frozen-backbone member
    may ship its network as int8 ONNX alone, its weights holding the head only) runs its fp32 network where
    one can be had (a cached export of its weights under ``auto``), else its int8 model. Each substitution
    is a warning."""
    if int8 is None:
        int8 = engine != "torch" and bundle.int8_status()[0]
    has_fp32, has_int8 = bundle.onnx_path(False) is not None, bundle.onnx_path(True) is not None
    if engine != "torch" and int8 and not has_int8:
        warnings.warn(f"ensemble member {name} has no int8 model: it runs its fp32 model", stacklevel=3)
        return make_engine(bundle, engine, False)
    if engine != "torch" and not int8 and has_int8 and not has_fp32:
        try:
            return make_engine(bundle, engine, False)
        except ConfigError:
            warnings.warn(f"ensemble member {name} has only an int8 ONNX model: it runs int8", stacklevel=3)
            return make_engine(bundle, engine, True)
    return make_engine(bundle, engine, int8)


def precision_choice(int8: bool = False, fp32: bool = False) -> bool | None:
    """The ``int8`` of :func:`make_engine` from the ``--int8`` and ``--fp32`` flags."""
    if int8 and fp32:
        raise ConfigError("--int8 and --fp32 exclude each other: give one")
    return True if int8 else False if fp32 else None


def make_engine(bundle: Bundle, engine="auto", int8: bool | None = False):
    """``auto``: ONNX Runtime (the bundle's model, or a cached export of it), else PyTorch; an ensemble
    gets its members' engines (:class:`EnsembleEngine`). An engine object is used as it is. ``int8``:
    the int8 model (True), the fp32 one (False), or the bundle's default (None: int8 where its recorded
    agreement with fp32 holds, :mod:`pneumoscan.model.quantization`)."""
    from pneumoscan.model.ensemble import Ensemble

    if not isinstance(engine, str):
        return engine
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")
    if engine == "torch" and int8:
        raise ConfigError("int8 is an ONNX model: --int8 goes with --engine onnx or auto, not torch")
    if isinstance(bundle, Ensemble):
        return EnsembleEngine(bundle, engine, int8)
    if int8 is None:
        int8 = engine != "torch" and bundle.int8_status()[0]
    if engine == "torch":
        return TorchEngine(bundle)
    onnx = bundle.onnx_path(int8)
    if onnx is None and int8:
        raise ConfigError(f"{bundle.path}: no int8 ONNX model in the bundle; run pneumoscan export --int8 first")
    if onnx is None and engine == "onnx":
        raise ConfigError(f"{bundle.path}: no ONNX model in the bundle; run pneumoscan export first")
    if onnx is not None:
        return OnnxEngine(onnx, bundle)
    return _cached_engine(bundle)


def _cached_engine(bundle: Bundle):
    """ONNX Runtime on the cached export; a cached file that fails its checks is exported again."""
    for fresh in (False, True):
        path = cached_onnx(bundle, fresh)
        if path is None:
            break
        try:
            return OnnxEngine(path, bundle)
        except ConfigError:
            continue
    return TorchEngine(bundle)
