"""Prediction on a local Ray cluster, started by the test: the same rows as a single process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.data, pytest.mark.ray]


def test_ray_prediction_matches_one_process(trained_bundle, small_data, tmp_path):
    import ray

    from pneumoscan import Classifier
    from pneumoscan.inference.distributed import iter_predictions_ray

    files = sorted((small_data / "test").rglob("*.jpeg"))[:40]
    broken = tmp_path / "broken.jpeg"
    broken.write_bytes(b"not an image")
    files.insert(7, broken)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        got = list(iter_predictions_ray(files, model=str(trained_bundle.path), actors=2))
    finally:
        ray.shutdown()
    expected = Classifier.load(trained_bundle.path).predict(files)
    assert [r.path for r in got] == [str(f) for f in files]  # input order kept
    assert [r.to_dict().keys() for r in got] == [r.to_dict().keys() for r in expected]
    for a, b in zip(got, expected):
        assert a.error == b.error and a.label == b.label
        assert a.probability == pytest.approx(b.probability, abs=1e-6) if b.ok else a.probability is None


def test_cli_ray_writes_the_rows_of_predict_output(trained_bundle, small_data, tmp_path):
    folder = small_data / "test" / "NORMAL"
    cli = [sys.executable, "-m", "pneumoscan.cli", "predict", str(folder), "--model", str(trained_bundle.path)]
    cli += ["--no-gate"]  # the small bundle's gate, fitted on about 20 validation films, refuses a few real ones
    single = subprocess.run(cli + ["--output", str(tmp_path / "one.jsonl")], capture_output=True, text=True)
    on_ray = subprocess.run(
        cli + ["--output", str(tmp_path / "ray.jsonl"), "--ray", "local"], capture_output=True, text=True, timeout=600
    )
    assert single.returncode == 0 and on_ray.returncode == 0, on_ray.stderr[-2000:]
    rows = [[json.loads(x) for x in (tmp_path / n).read_text().splitlines()] for n in ("one.jsonl", "ray.jsonl")]
    assert len(rows[0]) == 40 and [r["path"] for r in rows[0]] == [r["path"] for r in rows[1]]
    for a, b in zip(*rows):
        assert a["label"] == b["label"] and a["probability"] == pytest.approx(b["probability"], abs=1e-6)


@pytest.mark.parametrize(
    "address,fragment",
    [("127.0.0.1:1", "cannot connect"), ("nosuchhost.invalid:6379", "does not resolve"), ("nocolon", "HOST:PORT")],
)
def test_an_unreachable_cluster_fails_within_seconds(tmp_path, address, fragment):
    import time

    from corpus import REAL

    out = tmp_path / "r.jsonl"
    start = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "pneumoscan.cli", "predict", str(REAL), "--ray", address, "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and fragment in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert time.time() - start < 60 and not out.exists()  # nothing written before the cluster answered
