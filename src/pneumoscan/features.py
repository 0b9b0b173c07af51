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
from pathlib import Path

import numpy as np

from .backbones import get_backbone, sha256_file
from .data import Sample, load_images
from .errors import ConfigError

CHUNK = 256  # images decoded at a time (bounded memory for any split size)
CHECKPOINT = 1024  # images computed between stores written (a long run killed keeps what it did)


def cache_root() -> Path:
    """``$PNEUMOSCAN_CACHE/features``, else ``~/.cache/pneumoscan/features``."""
    return Path(os.environ.get("PNEUMOSCAN_CACHE", Path.home() / ".cache" / "pneumoscan")) / "features"


def weights_digest(backbone: str, weights) -> str:
    """The sha256 that names a backbone's weights: the registry's for ``"imagenet"``, else the file's."""
    if weights == "imagenet":
        source = get_backbone(backbone).weights
        if source is None:
            raise ConfigError(f"{backbone}: no recorded weights digest; pass a weights file")
        return source.sha256
    return sha256_file(Path(weights))


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


def _stored(cache: Path, prefix: str) -> tuple[dict[str, tuple[Path, int]], dict[str, str]]:
    """Every cached image of this network: key -> (store, row), and key -> error for unreadable ones."""
    from safetensors import safe_open

    rows, errors = {}, {}
    for store in sorted(cache.glob(prefix + "*.safetensors")):
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
    ``graph``: compute them with this ONNX features graph (:mod:`pneumoscan.frozen_onnx`) instead of
    PyTorch; they are then cached under the graph's sha256."""
    cache = cache or cache_root()
    if graph is not None:
        from .frozen_onnx import graph_digest

        prefix = _prefix(backbone, "onnx" + graph_digest(graph), image_size)
    else:
        prefix = _prefix(backbone, weights_digest(backbone, weights), image_size)
    keys = [image_key(s.path) for s in samples]
    rows, known_errors = _stored(cache, prefix)
    missing = [s for s, k in zip(samples, keys) if k not in rows and k not in known_errors]
    if missing:
        _compute(backbone, missing, image_size, weights, batch_size, progress, cache, prefix, graph)
        rows, known_errors = _stored(cache, prefix)
    width = get_backbone(backbone).feature_size
    return gather_rows(samples, keys, rows, known_errors, width)


def gather_rows(samples, keys, rows, known_errors, width: int) -> tuple[np.ndarray, list, list[str]]:
    """The stored rows ``(N, width)`` of the samples found in ``rows`` (key -> (store, row)), in order, the
    samples found, and the recorded error of each one that could not be read. Shared by every cache kept
    in stores of this format (features, teacher probabilities)."""
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
    return (np.stack(out) if out else np.zeros((0, width), np.float32)), kept, errors


def _compute(backbone, samples, image_size, weights, batch_size, progress, cache: Path, prefix: str, graph) -> None:
    """Features of ``samples``, written as stores of at most CHECKPOINT images."""
    from tqdm import tqdm

    run = _graph_runner(graph) if graph is not None else _torch_runner(backbone, weights, image_size)
    cache.mkdir(parents=True, exist_ok=True)
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
        _write_store(cache, prefix, features, keys, errors)
    bar.close()


def _torch_runner(backbone: str, weights, image_size: int):
    import torch

    from .models import create_model

    net = create_model(backbone, weights=weights, image_size=image_size).eval()

    def run(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return net.features(torch.from_numpy(images).unsqueeze(1)).float().numpy()

    return run


def _graph_runner(graph: Path):
    from .frozen_onnx import GraphFeatures

    return GraphFeatures(graph)


def _write_store(cache: Path, prefix: str, features: list, keys: list[str], errors: dict[str, str]) -> None:
    from safetensors.numpy import save_file

    name = hashlib.sha256(json.dumps(sorted(keys) + sorted(errors)).encode()).hexdigest()[:16]
    path = cache / f"{prefix}{name}.safetensors"
    tmp = path.with_suffix(".tmp")
    matrix = np.concatenate(features) if features else np.zeros((0, 1), np.float32)
    save_file({"features": matrix, "keys": _json_array(keys), "errors": _json_array(errors)}, str(tmp))
    os.replace(tmp, path)
