"""Safe model loading: a truncated, tampered or mismatched bundle stops with a clear one-line error."""

import json
import shutil
import subprocess
import sys

import pytest

from pneumoscan.core.errors import ConfigError
from pneumoscan.model.store import load_bundle


@pytest.fixture
def copy(trained_bundle, tmp_path):
    return shutil.copytree(trained_bundle.path, tmp_path / "model")


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_intact_bundle_loads(copy):
    bundle = load_bundle(copy)
    assert bundle.load_net() is not None and bundle.metrics["validation"]["n"] > 0


def test_pretrained_weights_provenance_in_config_and_card(copy):
    from pneumoscan.model.backbones import REGISTRY

    bundle = load_bundle(copy)
    source = REGISTRY["efficientnet_lite0"].weights
    recorded = bundle.config["pretrained"]
    assert recorded["sha256"] == source.sha256 and recorded["package"] == source.package
    assert recorded["licence"] == "Apache-2.0" and recorded["version"] == "0.1.0"
    assert source.sha256 in (copy / "MODEL_CARD.md").read_text()


def test_tampered_weights(copy):
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-100] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="sha256 does not match"):
        load_bundle(copy)


def test_truncated_weights(copy):
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="truncated or tampered"):
        load_bundle(copy)


@pytest.mark.parametrize(
    "changes,fragment",
    [
        ({"image_size": 150}, "image_size 150 but the weights were trained with '224'"),
        ({"backbone": "mobilenet_v2"}, "backbone 'mobilenet_v2' but the weights"),
        ({"threshold": 1.5}, "threshold 1.5 is not a probability"),
        ({"temperature": "hot"}, "'temperature' has the wrong type"),
        ({"format": "other/9"}, "unsupported bundle format"),
        ({"pretrained": {"package": ["x"]}}, "'pretrained' must map at most 16 keys to short strings"),
    ],
)
def test_mismatched_or_invalid_config(copy, changes, fragment):
    _edit_config(copy, **changes)
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_bundle(copy)


def test_broken_json_and_missing_files(copy, tmp_path):
    (copy / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_bundle(copy)
    with pytest.raises(ConfigError, match="not a model bundle"):
        load_bundle(tmp_path / "nowhere")


def test_cli_refuses_a_tampered_bundle_with_exit_2(copy):
    _edit_config(copy, weights_sha256="0" * 64)
    done = subprocess.run(
        [sys.executable, "-m", "pneumoscan.cli", "predict", "x.jpeg", "--model", str(copy)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "sha256 does not match" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
