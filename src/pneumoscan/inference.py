"""Prediction: the :class:`Classifier` API over a model bundle, with PyTorch or ONNX Runtime.

    >>> from pneumoscan import Classifier
    >>> clf = Classifier.load()                 # the bundled default model
    >>> clf.predict(["xray.jpeg"])[0].label
    'PNEUMONIA'

Inputs are decoded in a thread pool while the previous batch runs, and every input gets a
result: a probability, or the one-line reason it could not be read.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import threading
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice, repeat
from pathlib import Path

import numpy as np

from .bundle import ONNX_FEATURE_MAP, ONNX_FEATURES, ONNX_INPUT, ONNX_OUTPUT, Bundle, load_bundle
from .errors import ConfigError, ImageError, require_train_extra
from .feature_head import ERROR, Batch
from .gate import Verdict
from .images import ImageSource, prepare_with_chroma, source_name
from .labels import CLASSES, label_of
from .options import ENGINES, PREDICT_BATCH, PredictOptions
from .settings import DECLARED, declared


@dataclass
class Prediction:
    path: str
    probability: float | None = None
    label: str | None = None
    threshold: float | None = None
    error: str | None = None
    gate_score: float | None = None  # the input gate's score, where the bundle has a gate (over the limit: refused)
    gate_limit: float | None = None
    gated: bool = True  # False: predicted with the gate off (--no-gate, gate=False)
    subtype: str | None = None  # "bacterial" or "viral", for PNEUMONIA where the bundle has the head
    viral_probability: float | None = None
    warnings: list[str] = field(default_factory=list)  # a degraded film: what the input gate noticed
    extra: dict = field(default_factory=dict)  # result fields of feature heads that have no attribute above

    @property
    def ok(self) -> bool:
        return self.error is None

    def get(self, name: str):
        """The value of record field ``name`` (:data:`output.FIELDS`), or None where the result has none;
        ``gate`` is "off" for a result predicted with the gate off."""
        if name == "gate":
            return "off" if self.gate_score is not None and not self.gated else None
        if name in _ATTRIBUTES:
            return getattr(self, name)
        return self.extra.get(name)

    def set(self, name: str, value) -> None:
        """Set record field ``name`` (a feature head's result field)."""
        if name == "gate":
            self.gated = value != "off"
        elif name in _ATTRIBUTES:
            setattr(self, name, value)
        else:
            self.extra[name] = value

    def to_dict(self) -> dict:
        """The fields this result has, as JSON lines and the service write them (:func:`output.record`)."""
        from .output import record

        return record(self)


_ATTRIBUTES = {f for f in Prediction.__dataclass_fields__ if f != "extra"}


class TorchEngine:
    name = "torch"

    def __init__(self, bundle: Bundle):
        self.net = bundle.load_net()

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits ``(N,)`` and pooled features ``(N, F)``."""
        from .models import predict_outputs

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
        from .export import export_onnx

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
    agreement with fp32 holds, :mod:`pneumoscan.quantization`)."""
    from .ensemble import Ensemble

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


def expand_inputs(paths: Iterable[str | os.PathLike]) -> list[Path | Prediction]:
    """Files, folders (recursive) and glob patterns to image files, in argument order; an argument
    that matches nothing becomes a :class:`Prediction` carrying its error, in its place. A pattern's
    matches are expanded as if each were given itself (a folder walked, any other entry read and, where it
    is no image file, reported), so a glob reports what the folder given directly reports."""
    items: list[Path | Prediction] = []
    for arg in map(str, paths):
        if not arg.strip():
            items.append(Prediction(arg, error="empty path"))
        elif glob.has_magic(arg) and not os.path.lexists(arg):
            problems: list[tuple[str, str]] = []
            matched = glob_files(arg, problems)
            items += [Prediction(where, error=why) for where, why in problems]
            expanded = [item for match in matched for item in _expand_one(match, str(match))]
            items += list(dict.fromkeys(expanded)) or (
                [] if problems else [Prediction(arg, error="pattern matched no files")]
            )
        else:
            items += _expand_one(Path(arg), arg)
    return items


def _expand_one(path: Path, arg: str) -> list[Path | Prediction]:
    from .data import list_images

    if path.is_dir():
        problems: list[tuple[str, str]] = []
        found = list_images(path, problems)
        errors = [Prediction(where, error=why) for where, why in problems]
        return errors + (
            found or ([] if errors else [Prediction(arg, error="folder holds no images (.jpeg, .jpg, .png, .dcm)")])
        )
    if os.path.lexists(path):
        return [path]  # a FIFO, device or looping link too: the loader names what it is
    return [Prediction(arg, error="no such file or folder")]


def glob_files(pattern: str, problems: list[tuple[str, str]] | None = None) -> list[Path]:
    """What a glob pattern matches, sorted: files, folders and anything else that is there (``**``: any number
    of folders, hidden ones excepted, as in :func:`glob.glob`). The search keeps its own stack: a tree of any
    depth, no recursion limit; ``**`` does not follow links to folders (no loops). Folders on the way that exist
    but cannot be listed are named, with the reason, in ``problems``."""
    start = os.sep if pattern.startswith(os.sep) else ""
    parts = [part for part in pattern.split(os.sep) if part]
    found: set[str] = set()
    pending: list[tuple[str, int]] = [(start, 0)]
    seen: set[tuple[str, int]] = set()
    while pending:
        prefix, index = pending.pop()
        if (prefix, index) in seen:
            continue
        seen.add((prefix, index))
        if index == len(parts):
            if prefix and os.path.lexists(prefix) and not (parts[-1] == "**" and os.path.isdir(prefix)):
                found.add(prefix)
            continue
        part = parts[index]
        if not glob.has_magic(part):
            pending.append((os.path.join(prefix, part), index + 1))
            continue
        if part == "**":
            pending.append((prefix, index + 1))  # no folder at all
        for entry in _entries(prefix or os.curdir, problems):
            if entry.name.startswith(".") and not part.startswith("."):
                continue
            if part == "**":
                if entry.is_dir(follow_symlinks=False):
                    pending.append((os.path.join(prefix, entry.name), index))  # one folder more
                elif index == len(parts) - 1:  # a last ** matches files too
                    pending.append((os.path.join(prefix, entry.name), index + 1))
            elif fnmatch.fnmatchcase(entry.name, part):
                pending.append((os.path.join(prefix, entry.name), index + 1))
    return sorted(Path(p) for p in found)


def _entries(folder: str, problems: list[tuple[str, str]] | None = None) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError):  # nothing there to match, as in glob.glob
        return []
    except OSError as exc:  # there, but it cannot be listed: said, never silently empty
        if problems is not None:
            problems.append((folder, f"folder cannot be listed ({exc.strerror or exc})"))
        return []


class Classifier:
    """A trained model ready to predict and explain."""

    def __init__(self, bundle: Bundle, engine="auto", int8: bool | None = None, gate: bool = True):
        """``engine``: auto, onnx or torch (:data:`ENGINES`), or an engine object to share; ``int8``: the
        int8 model (True), fp32 (False) or the bundle's default (None, :func:`make_engine`)."""
        self.bundle = bundle
        self.engine = make_engine(bundle, engine, int8)
        self.heads = bundle.load_heads()  # the feature heads the bundle has (feature_heads.HEADS), in order
        self.gate = self.heads.get("gate")
        self.subtype = self.heads.get("subtype")
        self.gating = gate and self.gate is not None  # refuse what the gate does not accept
        if self.gate is None:
            warnings.warn(
                f"{bundle.name} has no input gate: every image gets a label, chest X-ray or not", stacklevel=2
            )
        self._pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2)
        self._torch_net = None
        self._cam_onnx: tuple | bool | None = None  # (session, head weights), False for none, None: not looked yet
        self._primary: Classifier | None = None  # an ensemble's primary member, for Grad-CAM
        self._explain_lock = threading.Lock()  # Grad-CAM hooks the shared network: one explanation at a time

    @classmethod
    @declared(PredictOptions, "engine", "int8", "fp32", "gate", path="model")
    def load(
        cls,
        path: str | os.PathLike | None = DECLARED,
        *,
        engine: str = DECLARED,
        int8: bool = DECLARED,
        fp32: bool = DECLARED,
        gate: bool = DECLARED,
    ) -> Classifier:
        """Open a bundle (the packaged default when ``path`` is None). It runs its int8 model where that is
        its default (:meth:`Bundle.int8_status`); ``int8`` or ``fp32`` asks for one. ``gate=False`` labels
        every image, also those the bundle's input gate would refuse (each result still carries its gate
        score)."""
        return cls(load_bundle(path), engine, precision_choice(int8, fp32), gate)

    @property
    def threshold(self) -> float:
        return self.bundle.threshold

    @property
    def has_gate(self) -> bool:
        """Whether this model has an input gate (for an ensemble, its primary member's)."""
        return self.gate is not None

    @property
    def has_subtype(self) -> bool:
        """Whether PNEUMONIA results say bacterial or viral (for an ensemble, its primary member's head)."""
        return self.subtype is not None

    @property
    def image_size(self) -> int:
        return self.bundle.image_size

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of PNEUMONIA from logits (the bundle's temperature applied)."""
        return self.bundle.probabilities(logits)

    def logits(self, images: np.ndarray, batch_size: int = PREDICT_BATCH) -> np.ndarray:
        """Logits for prepared uint8 images of shape ``(N, S, S)``."""
        return self.outputs(images, batch_size)[0]

    def outputs(
        self, images: np.ndarray, batch_size: int = PREDICT_BATCH, progress: bool = False, desc: str = "predicting"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Logits ``(N,)`` and pooled features ``(N, F)`` for prepared uint8 images ``(N, S, S)``; ``progress``
        shows a bar over the images on stderr."""
        from tqdm import tqdm

        parts = []
        with tqdm(total=len(images), desc=desc, unit="img", disable=not progress) as bar:
            for start in range(0, len(images), batch_size):
                chunk = images[start : start + batch_size]
                parts.append(self.engine.run(chunk))
                bar.update(len(chunk))
        if not parts:
            return np.zeros(0), np.zeros((0, 0), np.float32)
        return np.concatenate([p[0] for p in parts]).astype(np.float64), np.concatenate([p[1] for p in parts])

    def gate_verdicts(self, images: np.ndarray, features: np.ndarray, chroma=None) -> list[Verdict] | None:
        """The input gate on prepared images and their pooled features (None for a bundle without a gate);
        ``chroma``: each input's colourfulness before it became grey (:func:`images.prepare_with_chroma`)."""
        if self.gate is None:
            return None
        return self.gate.verdicts(images, features, self.features_from, chroma)

    @property
    def features_from(self) -> str:
        """The engine whose features the heads read (an ensemble's: its primary member's)."""
        return getattr(self.engine, "features_from", self.engine.name)

    @declared(PredictOptions, "batch_size")
    def predict(
        self,
        inputs: Iterable[ImageSource],
        batch_size: int = DECLARED,
        progress: bool = False,
        errors: str = "report",
        gate: bool | None = None,
    ) -> list[Prediction]:
        """One :class:`Prediction` per input, in input order; unreadable inputs carry ``error``
        (or, with ``errors="raise"``, raise their :class:`ImageError`), and so do inputs the input gate
        refuses (``gate=False`` labels them anyway; the default is the classifier's own setting)."""
        inputs = list(inputs)
        batches = self.iter_predictions(inputs, batch_size, progress, errors, total=len(inputs), gate=gate)
        return [result for batch in batches for result in batch]

    @declared(PredictOptions, "batch_size")
    def iter_predictions(
        self,
        inputs: Iterable[ImageSource],
        batch_size: int = DECLARED,
        progress: bool = False,
        errors: str = "report",
        total: int | None = None,
        gate: bool | None = None,
    ) -> Iterator[list[Prediction]]:
        """Predictions batch by batch, in input order, the next batch decoding while this one runs.
        Inputs are pulled as needed, so memory stays flat over any number of them."""
        from tqdm import tqdm

        gating = self.gating if gate is None else gate and self.gate is not None
        batches = (list(islice(it, batch_size)) for it in repeat(iter(inputs)))
        with tqdm(total=total, desc="predicting", unit="img", disable=not progress) as bar:
            pending = self._decode(next(batches))
            while pending:
                current, pending = pending, self._decode(next(batches))
                yield self._classify(current, errors, gating)
                bar.update(len(current))

    def _decode(self, sources: list) -> list:
        return [(source, self._pool.submit(self._prepare_one, source)) for source in sources]

    def _classify(self, decoding: list, errors: str, gating: bool) -> list[Prediction]:
        results: list[Prediction | None] = [None] * len(decoding)
        good, images, chroma = [], [], []
        for i, (source, future) in enumerate(decoding):
            prepared, error = future.result()
            if error is None:
                good.append(i)
                images.append(prepared[0])
                chroma.append(prepared[1])
            elif errors == "raise":
                raise error
            else:
                results[i] = Prediction(source_name(source), error=error.reason)
        if images:
            batch = np.stack(images)
            logits, features = self.engine.run(batch)
            names = [source_name(decoding[i][0]) for i in good]
            for i, result in zip(good, self.results(names, logits, features, gating, batch, chroma)):
                results[i] = result
        return results  # type: ignore[return-value]

    def results(
        self,
        names: list[str],
        logits: np.ndarray,
        features: np.ndarray,
        gating: bool,
        images: np.ndarray,
        chroma: list[float] | None = None,
    ) -> list[Prediction]:
        """Predictions from the engine's outputs on prepared ``images``: probability and label, and the
        result fields of every feature head the bundle has (the gate's score, and its refusal when
        ``gating``, else its warnings; the subtype of PNEUMONIA results). An input a head refuses gets that
        head's fields and its error, and no label."""
        probabilities = self.probabilities(logits)
        labels = [label_of(p, self.threshold) for p in probabilities]
        batch = Batch(images, features, probabilities, labels, self.features_from, chroma, gating)
        applied = [head.apply(batch) for head in self.heads.values()]
        out = []
        for n, (name, p, label) in enumerate(zip(names, probabilities, labels)):
            refused = next((rows[n] for rows in applied if gating and ERROR in rows[n]), None)
            if refused is not None:
                result = Prediction(name)
                for key, value in refused.items():
                    result.set(key, value)
            else:
                result = Prediction(name, float(p), label, self.threshold, gated=gating)
                for rows in applied:
                    for key, value in rows[n].items():
                        if key != ERROR:  # refusals are off
                            result.set(key, value)
            out.append(result)
        return out

    def predict_one(self, source: ImageSource) -> Prediction:
        return self.predict([source])[0]

    def _prepare_one(self, source: ImageSource):
        try:
            return prepare_with_chroma(source, self.bundle.preprocessing), None
        except ImageError as exc:
            # kept until the batch is classified: without its traceback, which holds the loader's frames and so
            # the input's bytes and parsed dataset (a refused 90 MB DICOM would otherwise keep 180 MB)
            cause: BaseException | None = exc
            while cause is not None:
                cause = cause.with_traceback(None).__cause__ or cause.__context__
            return None, exc
        except Exception as exc:  # noqa: BLE001 - one input's failure never costs the others their result
            return None, ImageError(source_name(source), f"cannot be read ({type(exc).__name__})")

    def explain(self, source: ImageSource):
        """Grad-CAM for the predicted class (:meth:`explain_class`). For an ensemble, the map is the primary
        member's Grad-CAM for the class the ensemble predicts, with the ensemble's probability."""
        from .ensemble import Ensemble

        if not isinstance(self.bundle, Ensemble):
            return self.explain_class(source)
        result = self.predict([source], errors="raise", gate=False)[0]
        if self._primary is None:
            self._primary = Classifier(self.bundle.primary, self.engine.members[0], gate=False)
        if hasattr(source, "seek"):
            source.seek(0)
        explanation = self._primary.explain_class(source, positive=result.label == CLASSES[1])
        explanation.probability, explanation.label = float(result.probability), result.label
        explanation.model = f"primary member {self.bundle.member_names[0]} ({self.bundle.primary.name})"
        return explanation

    def explain_class(self, source: ImageSource, positive: bool | None = None):
        """Grad-CAM for ``positive`` (PNEUMONIA) or not, by default the predicted class. With ONNX Runtime
        (the default engine) it needs no PyTorch: the fp32 ONNX model gives the last feature map and the
        head's gradient has a closed form (:func:`pneumoscan.explain.onnx_grad_cam`); with
        ``engine="torch"``, or a bundle whose ONNX model has no feature map, autograd does it
        (:func:`pneumoscan.explain.grad_cam`)."""
        from .explain import ClosedFormError, grad_cam, onnx_grad_cam

        args = (source, self.bundle.preprocessing, self.threshold, self.bundle.temperature, positive)
        with self._explain_lock:  # Grad-CAM by autograd hooks the shared network: one explanation at a time
            if self._cam_onnx is None:
                self._cam_onnx = self._onnx_explainer() or False
            if self._cam_onnx:
                try:
                    return onnx_grad_cam(*self._cam_onnx, *args)
                except ClosedFormError:
                    self._cam_onnx = False  # not pooling then the dense head: autograd from now on
            if self._torch_net is None:
                require_train_extra(f"Grad-CAM for {self.bundle.path} (no ONNX feature map it can be computed from)")
                self._torch_net = self.bundle.load_net()
            return grad_cam(self._torch_net, *args)

    def _onnx_explainer(self) -> tuple | None:
        """The ONNX Runtime session and head weights for Grad-CAM without autograd: the fp32 model in use,
        else the bundle's own (an int8 model's feature map is quantised); None where there is none with a
        feature map, the network's head is not the dense one, or the engine is PyTorch by choice."""
        if self.engine.name == "torch":
            return None
        head = self.bundle.head_weights()
        if head is None:
            return None
        if self.engine.name == "onnx":
            engine = self.engine
        elif (path := self.bundle.onnx_path(int8=False)) is not None:
            engine = OnnxEngine(path, self.bundle)
        else:
            return None
        return (engine.session, head) if engine.has_feature_map else None
