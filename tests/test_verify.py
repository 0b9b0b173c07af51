"""``pneumoscan verify``: a bundle's ONNX models against its weights, on the bundled reference X-rays."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from corpus import REAL

pytestmark = pytest.mark.data

CLI = [sys.executable, "-m", "pneumoscan.cli"]


def _cli(*args, **kw):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300, **kw)


def _shift_logit(bundle_path, name: str, shift: float) -> None:
    """Edit an ONNX graph of the bundle so that every logit gets ``shift`` added, keep its metadata (the
    weights digest included) and re-record its sha256: what a hostile author can do."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from pneumoscan.bundle import sha256_file

    path = bundle_path / name
    model = onnx.load(str(path))
    graph = model.graph
    for node in graph.node:
        node.output[:] = ["logit_raw" if out == "logit" else out for out in node.output]
    graph.initializer.append(numpy_helper.from_array(np.array(shift, np.float32), "shift"))
    graph.node.append(helper.make_node("Add", ["logit_raw", "shift"], ["logit"]))
    onnx.save(model, str(path))
    config = json.loads((bundle_path / "config.json").read_text())
    config["files"][name] = sha256_file(path)
    (bundle_path / "config.json").write_text(json.dumps(config))


def test_verify_passes_a_bundle_exported_here(exported_bundle):
    done = _cli("verify", "--model", exported_bundle.path)
    assert done.returncode == 0, done.stderr
    rows = done.stdout.strip().splitlines()
    assert rows[0].startswith("engine") and len(rows) == 3, done.stdout
    assert rows[1].startswith("onnx ") and rows[2].startswith("onnx-int8") and all(" ok " in r for r in rows[1:])


@pytest.mark.parametrize("name,shift", [("model.int8.onnx", 8.0), ("model.onnx", 0.5)])
def test_verify_catches_an_edited_graph_that_loads(exported_bundle, tmp_path, name, shift):
    from pneumoscan import Classifier
    from pneumoscan.verify import verify_bundle

    copy = shutil.copytree(exported_bundle.path, tmp_path / "model")
    _shift_logit(copy, name, shift)
    clf = Classifier.load(copy, engine="onnx", int8=name.endswith("int8.onnx"))  # every load check passes
    assert clf.predict_one(REAL).ok
    checks = {c.engine: c for c in verify_bundle(copy)}
    edited = "onnx-int8" if "int8" in name else "onnx"
    assert not checks[edited].ok and checks[edited].mean_logit == pytest.approx(shift, abs=1.0)
    assert all(c.ok for engine, c in checks.items() if engine != edited)
    done = _cli("verify", "--model", copy)
    assert done.returncode == 1 and "FAIL" in done.stdout and name in done.stderr, (done.stdout, done.stderr)


@pytest.mark.backbones
@pytest.mark.backbones
def test_verify_checks_a_head_only_bundle_against_its_own_head(head_only_bundle, tmp_path):
    """The bundled default passes; a head-only bundle (a frozen DINOv2) ships only an int8 graph whose head was
    fitted on that graph's features: its logits must be its head's on them (exactly), so a graph edited to shift
    every logit by 0.5, which quantisation would hide against float32, is caught."""
    from pneumoscan.verify import TOLERANCE, verify_bundle

    done = _cli("verify")
    assert done.returncode == 0 and "FAIL" not in done.stdout, (done.stdout, done.stderr)
    bundle, _ = head_only_bundle
    assert all(c.ok for c in verify_bundle(bundle.path))
    copy = shutil.copytree(bundle.path, tmp_path / "dinov2")
    _shift_logit(copy, "model.onnx", 0.5)
    (check,) = verify_bundle(copy)
    assert check.tolerance == TOLERANCE["head-only"] and not check.ok
    assert check.mean_logit == pytest.approx(0.5, abs=1e-3)
    assert check.max_features <= check.tolerance["features"]


def test_verify_without_torch_is_one_line(exported_bundle, tmp_path):
    """Where PyTorch is not installed (the base install), verify says so in one line, exit 2."""
    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named torch')\n")
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    done = _cli("verify", "--model", exported_bundle.path, env=env)
    assert done.returncode == 2 and "PyTorch" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_int8_with_the_torch_engine_is_refused(exported_bundle):
    done = _cli("predict", REAL, "--model", exported_bundle.path, "--int8", "--engine", "torch")
    assert done.returncode == 2 and "--int8" in done.stderr and len(done.stderr.strip().splitlines()) == 1
