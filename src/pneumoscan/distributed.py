"""Distributed prediction on Ray (optional: ``pip install -e ".[ray]"``).

Ray Data reads the file paths; a pool of actors, each holding one ONNX :class:`~pneumoscan.Classifier`,
predicts them in batches (``map_batches``); the driver receives the results in input order and writes
them exactly as ``predict --output`` does. Run it on a cluster (``--ray ADDRESS``), or on this machine
(``--ray local`` starts a local one).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from .errors import ConfigError
from .inference import PREDICT_BATCH, Prediction


class _Predictor:
    """One Ray actor: loads the bundle once, then classifies batches of paths."""

    def __init__(self, model: str | None, engine: str, int8: bool, gate: bool, batch_size: int):
        from .inference import Classifier

        self.classifier = Classifier.load(model, engine=engine, int8=int8, gate=gate)
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        results = self.classifier.predict([str(p) for p in batch["path"]], batch_size=self.batch_size)
        return {"result": [json.dumps(asdict(r)) for r in results]}


def iter_predictions_ray(
    files: list[Path],
    *,
    address: str = "local",
    model: str | None = None,
    engine: str = "auto",
    int8: bool = False,
    gate: bool = True,
    batch_size: int = PREDICT_BATCH,
    actors: int | None = None,
) -> Iterator[Prediction]:
    """Predictions for ``files`` from a pool of Ray actors, in input order. ``address``: a Ray cluster
    address, ``auto`` (the running cluster) or ``local`` (start one on this machine)."""
    try:
        import ray
    except ImportError:
        raise ConfigError('--ray needs Ray: pip install "pneumoscan[ray]"') from None
    if not ray.is_initialized():
        ray.init(
            address=None if address == "local" else address,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # results come back in input order
    context.enable_progress_bars = False
    pool = actors or max(1, int(ray.cluster_resources().get("CPU", os.cpu_count() or 1)) // 2)
    dataset = ray.data.from_items([{"path": str(f)} for f in files]).map_batches(
        _Predictor,
        fn_constructor_args=(model, engine, int8, gate, batch_size),
        batch_size=batch_size * 4,
        concurrency=pool,
        num_cpus=1,
    )
    for batch in dataset.iter_batches(batch_size=batch_size * 4, batch_format="numpy"):
        for row in batch["result"]:
            yield Prediction(**json.loads(row))
