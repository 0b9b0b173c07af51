"""Frozen-feature mode: backbone features computed once, cached, and heads fitted on them in seconds.

A frozen backbone gives the same features for the same image every time, so each image's features
are computed once per (backbone, weights sha256, image size) and kept under the cache folder
(``$PNEUMOSCAN_CACHE/features``) as safetensors stores, one per computation. An image is found again
by its key: its resolved path, size and modification time. A request computes only the images no
store holds yet (another split, a subset, a new file), so a ViT that runs at ~20 images/s on two
cores pays its forward pass once per image, not once per epoch, candidate or split.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumoscan.io.dataset import Sample, load_images
from pneumoscan.model.backbones import get_backbone, weights_digest

CHUNK = 256  # images decoded at a time (bounded memory for any split size)
CHECKPOINT = 1024  # images computed between stores written (a long run killed keeps what it did)


def cache_root() -> Path:
    """``$PNEUMOSCAN_CACHE/features``, else ``~/.cache/pneumoscan/features``."""
    return Path(os.environ.get("PNEUMOSCAN_CACHE", Path.home() / ".cache" / "pneumoscan")) / "features"


def image_key(path: str | Path) -> str:
    """What an image's features depend on besides the network: its resolved path, size and mtime."""
    stat = Path(path).stat()
    text = json.dumps([str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _prefix(backbone: str, digest: str, image_size: int) -> str:
    return f"{backbone}-{image_size}-{digest[:16]}-"


def _json_array(value) -> np.ndarray:
    return np.frombuffer(json.dumps(value).encode(), np.uint8)


def _read_json_array(array: np.ndarray):
    return json.loads(bytes(array).decode())


@dataclass(frozen=True)
class RowCache:
    """Rows computed once per image and kept in safetensors stores ``folder/prefix*.safetensors``, each store
    its images' keys (:func:`image_key`), their rows and the errors of those that could not be read: the
    frozen backbones' features and the teachers' probabilities."""

    folder: Path
    prefix: str
    width: int

    def rows(
        self, samples: list[Sample], compute: Callable[[list[Sample]], None]
    ) -> tuple[np.ndarray, list[Sample], list[str]]:
        """``(rows (N, width), the samples found, the recorded error of each one that could not be read)``;
        ``compute`` is called once with the samples not stored yet, and stores them (:meth:`write`)."""
        keys = [image_key(s.path) for s in samples]
        rows, known_errors = self._stored()
        missing = [s for s, k in zip(samples, keys) if k not in rows and k not in known_errors]
        if missing:
            self.folder.mkdir(parents=True, exist_ok=True)
            compute(missing)
            rows, known_errors = self._stored()
        from safetensors.numpy import load_file

        stores: dict[Path, np.ndarray] = {}
        out, kept, errors = [], [], []
        for sample, key in zip(samples, keys):
            if key in rows:
                store, row = rows[key]
                if store not in stores:
                    stores[store] = load_file(str(store))["features"]
                out.append(stores[store][row])
                kept.append(sample)
            else:
                errors.append(known_errors[key])
        return (np.stack(out) if out else np.zeros((0, self.width), np.float32)), kept, errors

    def write(self, rows: list[np.ndarray], keys: list[str], errors: dict[str, str]) -> None:
        """One store: ``rows`` (arrays of ``(n, width)``, concatenated) of the images ``keys``, and ``errors``
        (key -> message); written to a temporary file and moved into place (a killed run keeps the others)."""
        from safetensors.numpy import save_file

        name = hashlib.sha256(json.dumps(sorted(keys) + sorted(errors)).encode()).hexdigest()[:16]
        path = self.folder / f"{self.prefix}{name}.safetensors"
        tmp = path.with_suffix(".tmp")
        matrix = np.concatenate(rows) if rows else np.zeros((0, 1), np.float32)
        save_file({"features": matrix, "keys": _json_array(keys), "errors": _json_array(errors)}, str(tmp))
        os.replace(tmp, path)

    def _stored(self) -> tuple[dict[str, tuple[Path, int]], dict[str, str]]:
        """Every stored image: key -> (store, row), and key -> error for unreadable ones."""
        from safetensors import safe_open

        rows, errors = {}, {}
        for store in sorted(self.folder.glob(self.prefix + "*.safetensors")):
            try:
                with safe_open(str(store), framework="numpy") as f:
                    keys = _read_json_array(f.get_tensor("keys"))
                    errors.update(_read_json_array(f.get_tensor("errors")))
            except Exception:  # noqa: BLE001 - a torn or foreign file is ignored; its images are recomputed
                continue
            rows.update({k: (store, i) for i, k in enumerate(keys)})
        return rows, errors


def frozen_features(
    backbone: str,
    samples: list[Sample],
    image_size: int = 224,
    weights="imagenet",
    batch_size: int = 32,
    progress: bool = True,
    cache: Path | None = None,
    graph: Path | None = None,
) -> tuple[np.ndarray, list[Sample], list[str]]:
    """``(features (N, F) float32, kept samples, errors)`` of the pretrained backbone, each image taken
    from the cache where it was computed before. Unreadable images are left out and reported.
    ``graph``: compute them with this ONNX features graph (:mod:`pneumoscan.model.frozen_graphs`) instead of
    PyTorch; they are then cached under the graph's sha256."""
    cache = cache or cache_root()
    if graph is not None:
        from pneumoscan.model.frozen_graphs import graph_digest

        prefix = _prefix(backbone, "onnx" + graph_digest(graph), image_size)
    else:
        prefix = _prefix(backbone, weights_digest(backbone, weights), image_size)
    store = RowCache(cache, prefix, get_backbone(backbone).feature_size)
    return store.rows(
        samples, lambda missing: _compute(backbone, missing, image_size, weights, batch_size, progress, store, graph)
    )


def _compute(backbone, samples, image_size, weights, batch_size, progress, store: RowCache, graph) -> None:
    """Features of ``samples``, written as stores of at most CHECKPOINT images."""
    from tqdm import tqdm

    run = _graph_runner(graph) if graph is not None else _torch_runner(backbone, weights, image_size)
    bar = tqdm(total=len(samples), desc=f"{backbone} features", unit="img", disable=not progress)
    for part in range(0, len(samples), CHECKPOINT):
        features, keys, errors = [], [], {}
        for start in range(part, min(part + CHECKPOINT, len(samples)), CHUNK):
            chunk = samples[start : min(start + CHUNK, part + CHECKPOINT)]
            images, ok, bad = load_images(chunk, image_size, progress=False)
            keys += [image_key(s.path) for s in ok]
            failed = [s for s in chunk if s not in set(ok)]
            errors.update({image_key(s.path): message for s, message in zip(failed, bad)})
            for b in range(0, len(images), batch_size):
                features.append(run(images[b : b + batch_size]))
            bar.update(len(chunk))
        store.write(features, keys, errors)
    bar.close()


def _torch_runner(backbone: str, weights, image_size: int):
    import torch

    from pneumoscan.model.networks import create_model

    net = create_model(backbone, weights=weights, image_size=image_size).eval()

    def run(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return net.features(torch.from_numpy(images).unsqueeze(1)).float().numpy()

    return run


def _graph_runner(graph: Path):
    from pneumoscan.model.frozen_graphs import GraphFeatures

    return GraphFeatures(graph)
