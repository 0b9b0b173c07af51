"""Prediction: the :class:`Classifier` API over a model bundle, with PyTorch or ONNX Runtime.

    >>> from pneumoscan import Classifier
    >>> clf = Classifier.load()                 # the bundled default model
    >>> clf.predict(["xray.jpeg"])[0].label
    'PNEUMONIA'

Inputs are decoded in a thread pool while the previous batch runs, and every input gets a
result: a probability, or the one-line reason it could not be read.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice, repeat

import numpy as np

from pneumoscan.core.errors import ImageError, require_train_extra
from pneumoscan.core.labels import CLASSES, label_of
from pneumoscan.core.options import PREDICT_BATCH, PredictOptions
from pneumoscan.core.settings import DECLARED, declared
from pneumoscan.inference.engines import OnnxEngine, make_engine, precision_choice
from pneumoscan.inference.result import Prediction
from pneumoscan.io.images import ImageSource, prepare_with_chroma, source_name
from pneumoscan.model.bundle import Bundle
from pneumoscan.model.heads.base import ERROR, Batch
from pneumoscan.model.heads.gate import Verdict
from pneumoscan.model.store import load_bundle


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
        from pneumoscan.model.ensemble import Ensemble

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
        head's gradient has a closed form (:func:`pneumoscan.inference.explain.onnx_grad_cam`); with
        ``engine="torch"``, or a bundle whose ONNX model has no feature map, autograd does it
        (:func:`pneumoscan.inference.explain.grad_cam`)."""
        from pneumoscan.inference.explain import ClosedFormError, grad_cam, onnx_grad_cam

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
