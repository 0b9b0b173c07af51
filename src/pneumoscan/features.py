"""Frozen-feature mode: backbone features computed once, cached, and heads fitted on them in seconds.

A frozen backbone gives the same features for the same image every time, so they are computed once
per (backbone, weights sha256, image size, list of files with their sizes and modification times)
and kept as safetensors under the cache folder (``$PNEUMOSCAN_CACHE/features``). A ViT that runs
at ~20 images/s on two cores then costs its forward pass once, not once per epoch or per candidate.
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


def cache_key(backbone: str, digest: str, image_size: int, samples: list[Sample]) -> str:
    """sha256 over everything the features depend on; files by path, size and modification time."""
    listing = []
    for s in samples:
        stat = Path(s.path).stat()
        listing.append([str(Path(s.path).resolve()), stat.st_size, stat.st_mtime_ns])
    text = json.dumps([backbone, digest, image_size, listing])
    return hashlib.sha256(text.encode()).hexdigest()


def frozen_features(
    backbone: str,
    samples: list[Sample],
    image_size: int = 224,
    weights="imagenet",
    batch_size: int = 32,
    progress: bool = True,
    cache: Path | None = None,
) -> tuple[np.ndarray, list[Sample], list[str]]:
    """``(features (N, F) float32, kept samples, errors)`` of the pretrained backbone, from the cache
    when this exact (backbone, weights, size, files) was computed before. Unreadable images are left
    out and reported, as everywhere."""
    from safetensors.numpy import load_file, save_file

    cache = cache or cache_root()
    digest = weights_digest(backbone, weights)
    key = cache_key(backbone, digest, image_size, samples)
    path = cache / f"{backbone}-{image_size}-{key[:24]}.safetensors"
    if path.is_file():
        stored = load_file(str(path))
        kept_paths = json.loads(bytes(stored["kept"]).decode())
        by_path = {str(s.path): s for s in samples}
        errors = json.loads(bytes(stored["errors"]).decode())
        return stored["features"], [by_path[p] for p in kept_paths], errors

    features, kept, errors = _compute(backbone, samples, image_size, weights, batch_size, progress)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(
        {
            "features": features,
            "kept": np.frombuffer(json.dumps([str(s.path) for s in kept]).encode(), np.uint8),
            "errors": np.frombuffer(json.dumps(errors).encode(), np.uint8),
        },
        str(tmp),
        metadata={"backbone": backbone, "weights_sha256": digest, "image_size": str(image_size)},
    )
    os.replace(tmp, path)
    return features, kept, errors


def _compute(backbone, samples, image_size, weights, batch_size, progress):
    import torch
    from tqdm import tqdm

    from .models import create_model

    net = create_model(backbone, weights=weights, image_size=image_size).eval()
    out, kept, errors = [], [], []
    bar = tqdm(total=len(samples), desc=f"{backbone} features", unit="img", disable=not progress)
    with torch.inference_mode():
        for start in range(0, len(samples), CHUNK):
            images, ok, bad = load_images(samples[start : start + CHUNK], image_size, progress=False)
            kept += ok
            errors += bad
            for b in range(0, len(images), batch_size):
                batch = torch.from_numpy(images[b : b + batch_size]).unsqueeze(1)
                out.append(net.features(batch).float().numpy())
            bar.update(min(CHUNK, len(samples) - start))
    bar.close()
    width = get_backbone(backbone).feature_size
    return (np.concatenate(out) if out else np.zeros((0, width), np.float32)), kept, errors
