"""Every ``pneumoscan`` command the README and docs/usage.md show, run exactly as written (comment and all,
by bash) in one fresh folder holding what the pages name: a small real download (``archive.zip``), the
bundled example films and DICOM, bundles received or trained earlier. The pages' own ``data prepare`` lines
lay the download out first; the rest run in the pages' order, each line once. ``serve`` and ``listen`` are
started, asked and stopped. The README's first two lines are the install: tests/test_base_install.py runs
the first exactly; the second (apt-get, a fresh venv and this suite) is what ``.ci/run`` itself does."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import real_images
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "src" / "pneumoscan" / "examples"
PAGES = ("README.md", "docs/usage.md")
RUNNING = {"serve": 8000, "listen": 11112}  # they run until stopped: the port each answers on
IN_CHECKOUT = "src/pneumoscan/"  # a line naming the checkout's files runs in the checkout (it writes nothing)

pytestmark = pytest.mark.data


def shown_commands(page: str) -> list[str]:
    """The lines of a page's bash blocks that start with ``pneumoscan``, as written."""
    lines, block = [], None
    for line in (ROOT / page).read_text().splitlines():
        if line.startswith("```"):
            block = line[3:].strip() if block is None else None
        elif block == "bash" and line.startswith("pneumoscan "):
            lines.append(line)
    return lines


def in_run_order() -> list[str]:
    """Each distinct command (as the shell reads it, comments aside) once: ``data prepare`` first."""
    seen, ordered = set(), []
    for page in PAGES:
        for line in shown_commands(page):
            words = tuple(shlex.split(line, comments=True))
            if words not in seen:
                seen.add(words)
                ordered.append(line)
    return sorted(ordered, key=lambda line: not line.startswith("pneumoscan data prepare"))


COMMANDS = in_run_order()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, small_data, trained_bundle) -> Path:
    """A fresh folder with every name the pages' commands take as given."""
    from pneumoscan.model.store import default_bundle_path

    here = tmp_path_factory.mktemp("user")
    with zipfile.ZipFile(here / "archive.zip", "w") as z:  # the download as Kaggle names it, small
        for image in sorted(small_data.rglob("*.jpeg")):
            z.write(image.resolve(), f"chest_xray/{image.relative_to(small_data)}")
    films = sorted(EXAMPLES.glob("*/*.jpeg"))
    for name in ("scans", "archive"):
        (here / name).mkdir()
        for film in films:
            shutil.copy(film, here / name / film.name)
    shutil.copy(EXAMPLES / "dicom" / "person1946_bacteria_4875.dcm", here / "chest.dcm")
    shutil.copy(films[-1], here / "chest.jpeg")
    (here / "more").mkdir()
    for film in films[:2]:
        Image.open(film).save(here / "more" / f"{film.stem}.png")
    rng = np.random.default_rng(0)  # a colour picture that is no X-ray
    sky = np.linspace([40, 90, 200], [250, 220, 120], 300)[:, None, :] + rng.normal(0, 8, (300, 400, 3))
    Image.fromarray(sky.clip(0, 255).astype(np.uint8)).save(here / "photo.png")
    for label in ("NORMAL", "PNEUMONIA"):  # a site's own labelled films: training films the archive lacks
        (here / "local" / label).mkdir(parents=True)
        for film in real_images("train", label, 20, offset=1):
            shutil.copy(film, here / "local" / label / film.name)
    (here / "site-films").mkdir()  # a site's unlabelled films, as many as adapt needs
    for film in real_images("train", "NORMAL", 30, offset=2) + real_images("train", "PNEUMONIA", 30, offset=2):
        shutil.copy(film, here / "site-films" / film.name)
    shutil.copytree(default_bundle_path(), here / "received-bundle")
    shutil.copytree(default_bundle_path(), here / "A")
    shutil.copytree(trained_bundle.path, here / "B")
    shutil.copytree(trained_bundle.path, here / "runs" / "old" / "model")
    return here


def shell(line: str, cwd: Path, **kw) -> subprocess.Popen:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # this venv's pneumoscan
    return subprocess.Popen(["bash", "-c", line], cwd=cwd, env={**os.environ, "PATH": path}, text=True, **kw)


def _taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _answers(name: str, line: str) -> bool:
    if name == "serve":
        try:
            return httpx.get("http://127.0.0.1:8000/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False
    calling = re.search(r"--allow (\S+)", line)
    echo = ["echoscu", "-aet", calling.group(1) if calling else "ECHOSCU", "-aec", "PNEUMOSCAN", "127.0.0.1", "11112"]
    return subprocess.run(echo, capture_output=True, timeout=30).returncode == 0


def run_until_asked(name: str, line: str, cwd: Path) -> None:
    """Start a command that runs until stopped, ask it once, stop it as a service manager does."""
    if _taken(RUNNING[name]):
        pytest.fail(f"port {RUNNING[name]} is taken by another program: {line!r} cannot be checked")
    process = shell(line, cwd, stderr=subprocess.PIPE)
    try:
        deadline, answered = time.time() + 120, False
        while time.time() < deadline and not answered and process.poll() is None:
            answered = _answers(name, line)
            time.sleep(0.3)
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    assert answered, err[-2000:]
    assert "unexpected" not in err and "Traceback" not in err, err[-2000:]


@pytest.mark.parametrize("line", COMMANDS)
def test_the_pages_commands_run_as_written(line, folder):
    words = shlex.split(line, comments=True)
    if words[1] in RUNNING:
        return run_until_asked(words[1], f"exec {line}", folder)
    process = shell(line, ROOT if IN_CHECKOUT in line else folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = process.communicate(timeout=900)
    assert process.returncode == 0, f"{line}\nexit {process.returncode}\n{err[-3000:]}"
    assert "unexpected" not in err and "Traceback" not in err, err[-3000:]


def test_the_pages_show_every_command_the_suite_runs():
    """Nothing dropped silently: each page shows commands, and the README the bare demo and a DICOM film."""
    assert all(shown_commands(page) for page in PAGES)
    assert len(COMMANDS) >= 25, COMMANDS
    assert any(".dcm" in line for line in COMMANDS) and any(" listen " in line for line in COMMANDS)
