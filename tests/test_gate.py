"""The input gate: fitted with the model, one behaviour on every prediction path, measured refusals."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest

from pneumoscan.errors import ConfigError
from pneumoscan.gate import Gate


def _features(rng, n, shift=0.0):
    """Non-negative like pooled activations: squares of a low-rank signal plus noise."""
    basis = np.random.default_rng(0).normal(size=(8, 64))
    return (0.3 * rng.normal(size=(n, 8)) @ basis + rng.normal(0, 0.05, (n, 64)) + 10 + shift) ** 2


def test_gate_scores_typical_points_low_and_others_high(tmp_path):
    rng = np.random.default_rng(1)
    gate = Gate.fit(_features(rng, 500), _features(rng, 200), k=8, keep=0.99)
    inside = gate.score(_features(rng, 300))
    assert 1.0 < np.median(inside) < 4.0 and gate.accepts(inside).mean() > 0.95
    off_subspace = gate.score(rng.normal(10, 1, (50, 64)) ** 2)  # energy outside the training directions
    far = gate.score(_features(rng, 50, shift=25.0))
    assert not gate.accepts(off_subspace).any() and not gate.accepts(far).any()
    assert gate.score(np.full((1, 64), np.nan))[0] == np.inf
    (tmp_path / "g.safetensors").write_bytes(gate.to_bytes())
    again = Gate.load(tmp_path / "g.safetensors", n_features=64)
    probe = _features(rng, 5)
    assert np.allclose(again.score(probe), gate.score(probe), rtol=1e-4)
    assert again.limit == pytest.approx(gate.limit, rel=1e-6)


def test_a_broken_gate_file_is_refused(tmp_path):
    from safetensors.numpy import save

    (tmp_path / "g.safetensors").write_bytes(
        save(
            {
                "mean": np.zeros(4, np.float32),
                "components": np.zeros((2, 5), np.float32),
                "scale": np.ones(2, np.float32),
                "residual_scale": np.ones(1, np.float32),
                "limit": np.ones(1, np.float32),
            }
        )  # fmt: skip
    )
    with pytest.raises(ConfigError, match="wrong shapes"):
        Gate.load(tmp_path / "g.safetensors")
    (tmp_path / "h.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="not a readable gate"):
        Gate.load(tmp_path / "h.safetensors")


@pytest.mark.data
def test_trained_bundles_carry_a_verified_gate(trained_bundle):
    assert "gate.safetensors" in trained_bundle.config["files"]
    gate = trained_bundle.load_gate()
    assert gate is not None and gate.limit > 0 and gate.components.shape[1] == 1280


@pytest.mark.data
def test_refusals_on_every_path(trained_bundle, tmp_path):
    """A photograph and a blank image are refused by predict (jsonl error naming "chest X-ray", exit 1),
    the API (error, gate score) and the service (422); a real X-ray passes; --no-gate labels them all."""
    from corpus import REAL
    from fastapi.testclient import TestClient
    from ood import noise_and_blank, photographs

    from pneumoscan import Classifier
    from pneumoscan.service import create_app

    inputs = {"cat.png": photographs()["chelsea"], "blank.png": noise_and_blank()["blank 128"]}
    for name, data in inputs.items():
        (tmp_path / name).write_bytes(data)
    files = [tmp_path / "cat.png", tmp_path / "blank.png", REAL]
    cmd = [sys.executable, "-m", "pneumoscan.cli", "predict", *map(str, files), "--model", str(trained_bundle.path)]
    done = subprocess.run(cmd + ["--format", "jsonl"], capture_output=True, text=True, timeout=300)
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 1
    assert all("chest X-ray" in r["error"] and r["gate_score"] > r["gate_limit"] for r in rows[:2]), rows
    assert "probability" in rows[2] and rows[2]["gate_score"] <= rows[2]["gate_limit"]
    anyway = subprocess.run(cmd + ["--format", "jsonl", "--no-gate"], capture_output=True, text=True, timeout=300)
    rows = [json.loads(line) for line in anyway.stdout.splitlines()]
    assert anyway.returncode == 0 and all(r["gate"] == "off" and "label" in r for r in rows)

    clf = Classifier.load(trained_bundle.path)
    results = clf.predict(files)
    assert [r.ok for r in results] == [False, False, True] and all(r.gate_score is not None for r in results)
    assert all(r.ok for r in clf.predict(files, gate=False))

    client = TestClient(create_app(classifier=clf))
    refused = client.post("/v1/predict", files={"file": ("cat.png", inputs["cat.png"])})
    assert refused.status_code == 422 and "cat.png: does not look like a chest X-ray" in refused.json()["detail"]
    forced = client.post("/v1/predict", params={"gate": "false"}, files={"file": ("cat.png", inputs["cat.png"])})
    assert forced.status_code == 200 and forced.json()["gate"] == "off"
    xray = client.post("/v1/predict", files={"file": ("x.jpeg", REAL.read_bytes())})
    assert xray.status_code == 200 and xray.json()["gate_score"] <= xray.json()["gate_limit"]


@pytest.mark.data
def test_bundled_gate_refuses_what_it_must_and_keeps_the_test_split():
    """The shipped model's gate: every photograph, CT/MR slice, document, noise and blank image refused;
    at most 1% of each class of the official test split refused."""
    from conftest import D224
    from ood import MUST_REFUSE

    from pneumoscan import Classifier
    from pneumoscan.data import load_split

    clf = Classifier.load()
    assert clf.gate is not None
    for name, make in MUST_REFUSE.items():
        results = clf.predict([io.BytesIO(data) for data in make().values()])
        assert all(not r.ok and "chest X-ray" in r.error for r in results), (name, [r.to_dict() for r in results])
    samples = load_split(D224, "test")
    results = clf.predict([s.path for s in samples])
    for label in (0, 1):
        refused = [r for r, s in zip(results, samples) if s.label == label and not r.ok]
        assert len(refused) <= 0.01 * sum(s.label == label for s in samples), [r.path for r in refused]
