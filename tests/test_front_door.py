"""Every command as a new user first types it: bare, and with only its required arguments (each option's
documented default applied). Each exits 0, 1 or 2; an error is one line, never "unexpected". The README's first
line, exactly as written, is run by tests/test_base_install.py."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from conftest import link_dataset, real_images

from pneumoscan.cli.main import _COMMANDS

EXAMPLES = Path(__file__).resolve().parents[1] / "src" / "pneumoscan" / "examples"
RUNNING = {"serve", "listen"}  # they run until stopped: started, asked, stopped
BATCH = sorted(set(_COMMANDS) - RUNNING)


def cli(*args, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pneumoscan.cli", *map(str, args)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def assert_one_line_or_none(done: subprocess.CompletedProcess) -> None:
    assert done.returncode in (0, 1, 2), (done.returncode, done.stderr[-2000:])
    assert "unexpected" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    if done.returncode == 2:
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.parametrize("name", BATCH)
def test_every_command_bare_exits_with_one_line(name, tmp_path):
    done = cli(*name.split(), cwd=tmp_path)
    assert_one_line_or_none(done)


def test_demo_bare_writes_its_documented_default_folder(tmp_path):
    done = cli("demo", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "pneumoscan-demo" / "report.html").stat().st_size > 100_000


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """12 + 12 real training images, the official 8 + 8 val, 6 + 6 test (symlinks)."""
    return link_dataset(tmp_path_factory.mktemp("tiny"), {"train": 12, "val": 8, "test": 6})


@pytest.fixture(scope="module")
def archive(tiny_data, tmp_path_factory) -> Path:
    """The download as Kaggle names it: ``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/`` in a zip."""
    path = tmp_path_factory.mktemp("download") / "archive.zip"
    with zipfile.ZipFile(path, "w") as z:
        for image in sorted(tiny_data.rglob("*.jpeg")):
            z.write(image.resolve(), f"chest_xray/{image.relative_to(tiny_data)}")
    return path


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> Path:
    """``train --data ROOT --out RUN``: the default recipe on the tiny set, as a user would first try it."""
    run = tmp_path_factory.mktemp("run") / "run"
    done = cli("train", "--data", tiny_data, "--out", run, cwd=run.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return run / "model"


def required_arguments(name: str, data: Path, model: Path, tmp: Path, archive: Path) -> list:
    """Only what each command requires (its positional arguments and required options)."""
    return {
        "demo": [],
        "models": [],
        "verify": [],
        "export": ["--out", tmp / "model.onnx"],  # the bundled model is never rewritten: an export goes elsewhere
        "train": ["--data", data, "--out", tmp / "run"],
        "data check": [data],
        "data prepare": [archive, "--out", tmp / "laid-out"],
        "evaluate": ["--data", data],
        "calibrate": ["--data", data / "val", "--out", tmp / "site"],
        "predict": [EXAMPLES / "PNEUMONIA"],
        "heads fit": [shutil.copytree(model, tmp / "bundle"), "--data", data],
        "ensemble": [model, "--out", tmp / "ens"],  # one member is enough; its validation patients fit the temperature
        "adapt": ["--data", site_films(tmp), "--out", tmp / "adapted"],  # the bundled model's training data as recorded
    }[name]


def site_films(tmp: Path) -> Path:
    """60 real unlabelled films, as many as adapt needs, in one folder."""
    site = tmp / "site-films"
    site.mkdir()
    for film in real_images("train", "NORMAL", 30, offset=5) + real_images("train", "PNEUMONIA", 30, offset=5):
        shutil.copy(film, site / film.name)
    return site


@pytest.mark.parametrize("name", [n for n in BATCH if n != "train"])  # train: the `trained` fixture
def test_every_command_runs_with_only_its_required_arguments(name, tiny_data, trained, archive, tmp_path, request):
    if name in ("heads fit", "ensemble"):  # they need a member with enough held-out patients: the shared bundle
        bundle, data = request.getfixturevalue("trained_bundle").path, request.getfixturevalue("small_data")
    else:
        bundle, data = trained, tiny_data
    done = cli(*name.split(), *required_arguments(name, data, bundle, tmp_path, archive), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "unexpected" not in done.stderr


def _stop(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGTERM)
    try:
        _, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
        raise AssertionError(f"did not stop within 30 s of SIGTERM: {err[-2000:]}") from None
    return err


def _taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _refuses_the_taken_port(name: str, tmp_path: Path) -> None:
    """Where another program holds the documented port, the command says so in one line (exit 2)."""
    done = cli(name, cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    assert_one_line_or_none(done)


def test_serve_bare_answers_on_its_documented_address(tmp_path):
    """``pneumoscan serve`` with no option: http://127.0.0.1:8000/."""
    if _taken(8000):
        return _refuses_the_taken_port("serve", tmp_path)
    process = subprocess.Popen(
        [sys.executable, "-m", "pneumoscan.cli", "serve"], cwd=tmp_path, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline, answered = time.time() + 90, None
        while time.time() < deadline and answered is None and process.poll() is None:
            try:
                answered = httpx.get("http://127.0.0.1:8000/healthz", timeout=2)
            except httpx.TransportError:
                time.sleep(0.3)
        assert answered is not None and answered.status_code == 200
    finally:
        err = _stop(process)
    assert "unexpected" not in err


@pytest.mark.dicom
def test_listen_bare_answers_an_echo_and_stops_on_sigterm(tmp_path):
    """``pneumoscan listen`` with no option (AE PNEUMOSCAN on 127.0.0.1:11112, results in ./), checked by
    dcmtk's echoscu, then stopped as a service manager stops it."""
    if _taken(11112):
        return _refuses_the_taken_port("listen", tmp_path)
    process = subprocess.Popen(
        [sys.executable, "-m", "pneumoscan.cli", "listen"], cwd=tmp_path, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline, echoed = time.time() + 90, False
        while time.time() < deadline and not echoed and process.poll() is None:
            done = subprocess.run(
                ["echoscu", "-aec", "PNEUMOSCAN", "127.0.0.1", "11112"], capture_output=True, timeout=30
            )
            echoed = done.returncode == 0
            time.sleep(0.3)
        assert echoed
    finally:
        err = _stop(process)
    assert process.returncode == 0 and "unexpected" not in err, err
    assert "results in" in err
