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

from pneumoscan.core.errors import ConfigError
from pneumoscan.core.options import PredictOptions
from pneumoscan.core.settings import DECLARED, declared
from pneumoscan.inference.result import Prediction


class _Predictor:
    """One Ray actor: loads the bundle once, then classifies batches of paths."""

    def __init__(self, model: str | None, engine: str, int8: bool, fp32: bool, gate: bool, batch_size: int):
        from pneumoscan.inference.classifier import Classifier

        self.classifier = Classifier.load(model, engine=engine, int8=int8, fp32=fp32, gate=gate)
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        results = self.classifier.predict([str(p) for p in batch["path"]], batch_size=self.batch_size)
        return {"result": [json.dumps(asdict(r)) for r in results]}


RAY_CONNECT_SECONDS = 5.0  # an address that does not answer within this is an error, not a wait


@declared(PredictOptions, "model", "engine", "int8", "fp32", "gate", "batch_size")
def iter_predictions_ray(
    files: list[Path],
    *,
    address: str = "local",
    model: str | None = DECLARED,
    engine: str = DECLARED,
    int8: bool = DECLARED,
    fp32: bool = DECLARED,
    gate: bool = DECLARED,
    batch_size: int = DECLARED,
    actors: int | None = None,
) -> Iterator[Prediction]:
    """Predictions for ``files`` from a pool of Ray actors, in input order. ``address``: a Ray cluster
    address (``HOST:PORT`` or ``ray://HOST:PORT``), ``auto`` (the running cluster) or ``local`` (start one
    on this machine). The cluster is joined here (:func:`connect`), before the first result is asked for."""
    ray = connect(address)
    return _predictions(ray, files, model, engine, int8, fp32, gate, batch_size, actors)


def connect(address: str = "local"):
    """Join (or start, for ``local``) the Ray cluster and return the ``ray`` module; an address that cannot
    be reached is a :class:`ConfigError` within seconds, never a wait."""
    try:
        import ray
    except ImportError:
        raise ConfigError('--ray needs Ray: pip install "pneumoscan[ray]"') from None
    if ray.is_initialized():
        return ray
    if address not in ("local", "auto"):
        check_reachable(address)
    try:
        ray.init(
            address=None if address == "local" else address,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    except Exception as exc:  # noqa: BLE001 - Ray's own errors are many; each is one line here
        reason = str(exc).strip().splitlines()[0][:150] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--ray {address}: cannot join the cluster ({reason})") from None
    return ray


def check_reachable(address: str, seconds: float = RAY_CONNECT_SECONDS) -> None:
    """``HOST:PORT`` (optionally ``ray://``) resolves and accepts a TCP connection within ``seconds``."""
    import socket
    import threading

    host, _, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise ConfigError(f"--ray {address}: expected HOST:PORT, 'auto' or 'local'")
    found: list = []

    def resolve():
        try:
            found.append(socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0][4])
        except OSError as exc:
            found.append(exc)

    worker = threading.Thread(target=resolve, daemon=True)  # getaddrinfo has no timeout of its own
    worker.start()
    worker.join(seconds)
    if not found:
        raise ConfigError(f"--ray {address}: {host} did not resolve within {seconds:g} s")
    if isinstance(found[0], OSError):
        raise ConfigError(f"--ray {address}: {host} does not resolve ({found[0].strerror or found[0]})")
    try:
        socket.create_connection(found[0][:2], timeout=seconds).close()
    except OSError as exc:
        reason = f"no answer within {seconds:g} s" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
        raise ConfigError(f"--ray {address}: cannot connect ({reason})") from None


def _predictions(ray, files, model, engine, int8, fp32, gate, batch_size, actors) -> Iterator[Prediction]:
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # results come back in input order
    context.enable_progress_bars = False
    pool = actors or max(1, int(ray.cluster_resources().get("CPU", os.cpu_count() or 1)) // 2)
    dataset = ray.data.from_items([{"path": str(f)} for f in files]).map_batches(
        _Predictor,
        fn_constructor_args=(model, engine, int8, fp32, gate, batch_size),
        batch_size=batch_size * 4,
        concurrency=pool,
        num_cpus=1,
    )
    for batch in dataset.iter_batches(batch_size=batch_size * 4, batch_format="numpy"):
        for row in batch["result"]:
            yield Prediction(**json.loads(row))
