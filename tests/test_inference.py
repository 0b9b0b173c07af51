import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import D224, VAL_FULLRES, real_images
from corpus import REAL, write
from PIL import Image

from pneumoscan import Classifier
from pneumoscan.core.errors import ConfigError
from pneumoscan.inference.explain import class_activation_map
from pneumoscan.io.images import prepare


@pytest.fixture(scope="module")
def clf(trained_bundle):
    """The small test bundle without its gate: its gate, fitted on about 20 validation films, refuses a
    few real films (the gate is tested on the shipped bundle in test_gate.py); these tests are about
    decoding, batching and engines."""
    return Classifier.load(trained_bundle.path, engine="torch", gate=False)


def test_predict_accepts_paths_pil_and_arrays(clf):
    by_path = clf.predict_one(REAL)
    assert by_path.ok and by_path.label in ("NORMAL", "PNEUMONIA") and 0 <= by_path.probability <= 1
    assert by_path.label == ("PNEUMONIA" if by_path.probability >= clf.threshold else "NORMAL")
    assert clf.predict_one(Image.open(REAL)).probability == pytest.approx(by_path.probability, abs=1e-6)
    assert clf.predict_one(np.asarray(Image.open(REAL))).probability == pytest.approx(by_path.probability, abs=1e-6)


@pytest.mark.data
def test_one_corrupt_file_does_not_spoil_the_batch(clf, tmp_path):
    files = real_images("test", "NORMAL", 20) + real_images("test", "PNEUMONIA", 20)
    bad = write(tmp_path, "corrupt.jpeg", REAL.read_bytes()[:500])
    inputs = files[:13] + [bad] + files[13:]
    results = clf.predict(inputs, batch_size=8)
    assert len(results) == 41 and sum(r.ok for r in results) == 40
    assert results[13].path == str(bad) and "corrupt.jpeg" not in results[13].error
    alone = {str(f): clf.predict_one(f).probability for f in files[:3] + files[-3:]}
    for r in results:
        if r.path in alone:
            assert r.probability == pytest.approx(alone[r.path], abs=1e-6)  # aligned with its own file


@pytest.mark.data
def test_onnx_matches_torch_on_real_images(exported_bundle):
    files = (
        real_images("test", "NORMAL", 12)
        + real_images("test", "PNEUMONIA", 12)
        + sorted(VAL_FULLRES.rglob("*.jpeg"))[:4]
    )
    torch_p = [r.probability for r in Classifier.load(exported_bundle.path, engine="torch", gate=False).predict(files)]
    onnx = Classifier.load(exported_bundle.path, gate=False)  # auto: the bundle now carries model.onnx
    assert onnx.engine.name == "onnx"
    onnx_p = [r.probability for r in onnx.predict(files)]
    assert np.max(np.abs(np.array(torch_p) - np.array(onnx_p))) < 1e-4


@pytest.mark.data
def test_int8_stays_close(exported_bundle):
    from pneumoscan.core.metrics import roc_auc

    files = real_images("test", "NORMAL", 30) + real_images("test", "PNEUMONIA", 30)
    y = [0] * 30 + [1] * 30
    fp32 = [r.probability for r in Classifier.load(exported_bundle.path, engine="onnx", gate=False).predict(files)]
    int8 = Classifier.load(exported_bundle.path, engine="onnx", int8=True, gate=False)
    assert int8.engine.name == "onnx-int8"
    q = [r.probability for r in int8.predict(files)]
    assert np.mean(np.abs(np.array(fp32) - np.array(q))) < 0.06  # a 2-epoch model with a sharpening temperature
    assert roc_auc(y, q) > roc_auc(y, fp32) - 0.03


def test_auto_engine_exports_once_into_the_cache(trained_bundle):
    from pneumoscan.inference.engines import onnx_cache_path

    clf = Classifier.load(trained_bundle.path)  # the bundle carries no ONNX model
    assert clf.engine.name == "onnx"
    cached = onnx_cache_path(trained_bundle)
    assert cached.is_file() and not (trained_bundle.path / "model.onnx").exists()
    written = cached.stat().st_mtime_ns
    assert Classifier.load(trained_bundle.path).engine.name == "onnx"
    assert cached.stat().st_mtime_ns == written  # exported once, then reused
    torch_p = Classifier.load(trained_bundle.path, engine="torch").predict_one(REAL).probability
    assert clf.predict_one(REAL).probability == pytest.approx(torch_p, abs=1e-4)


def test_missing_onnx_is_a_clear_error(trained_bundle):
    with pytest.raises(ConfigError, match="no ONNX model"):
        Classifier.load(trained_bundle.path, engine="onnx")


def test_grad_cam_for_the_predicted_class(clf):
    explanation = clf.explain(REAL)
    assert explanation.heatmap.shape == explanation.image.shape == (224, 224)
    assert explanation.heatmap.min() >= 0 and explanation.heatmap.max() == pytest.approx(1.0, abs=1e-3)
    assert explanation.heatmap.std() > 0.01
    x = __import__("torch").from_numpy(prepare(REAL, clf.image_size))[None, None]
    positive = explanation.label == "PNEUMONIA"
    chosen, _ = class_activation_map(clf._torch_net, x, positive)
    other, _ = class_activation_map(clf._torch_net, x, not positive)
    small = np.asarray(Image.fromarray(explanation.heatmap).resize(chosen.shape[::-1], Image.Resampling.BILINEAR))

    def correlation(a, b):  # a constant map (no positive evidence for that class at all) correlates with nothing
        return 0.0 if a.std() == 0 or b.std() == 0 else np.corrcoef(a.ravel(), b.ravel())[0, 1]

    assert correlation(small, chosen) > max(correlation(small, other), 0.5)
    assert explanation.blend().size == (224, 224)
    overlay = explanation.overlay()  # with the label, probability and colour bar around the film
    assert overlay.mode == "RGB" and overlay.width > 224 and overlay.height > 224


@pytest.mark.data
def test_grad_cam_on_full_resolution_keeps_the_aspect(clf):
    path = sorted(VAL_FULLRES.rglob("*.jpeg"))[0]
    explanation = clf.explain(path)
    w, h = Image.open(path).size
    assert max(explanation.image.shape) == min(1024, max(w, h))
    assert explanation.heatmap.shape == explanation.image.shape


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "pneumoscan.cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )


@pytest.mark.data
def test_cli_predict_formats_and_exit_codes(trained_bundle, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for f in real_images("test", "NORMAL", 3):
        (folder / f.name).symlink_to(f)
    write(folder, "bad.jpeg", b"nope")
    done = _cli(
        "predict",
        folder,
        tmp_path / "nope.jpeg",
        "--model",
        trained_bundle.path,
        "--format",
        "jsonl",
        "--cam",
        tmp_path / "cams",
        "--no-gate",
    )
    assert done.returncode == 1
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(rows) == 5 and sum("error" in r for r in rows) == 2
    assert rows[-1] == {"path": str(tmp_path / "nope.jpeg"), "error": "no such file or folder"}  # argument order kept
    assert all({"path", "probability", "label", "threshold", "gate_score"} <= set(r) for r in rows if "error" not in r)
    assert "bad.jpeg" in done.stderr and "Traceback" not in done.stderr
    assert len(list((tmp_path / "cams").glob("*.cam.png"))) == 3
    ok = _cli(
        "predict",
        real_images("test", "PNEUMONIA", 1)[0],
        "--model",
        trained_bundle.path,
        "--format",
        "csv",
        "--no-gate",
    )
    header = "path,probability,label,threshold,error,gate_score,gate,subtype,viral_probability,warnings"
    assert ok.returncode == 0 and ok.stdout.splitlines()[0] == header
    glob = _cli("predict", f"{D224}/test/NORMAL/IM-000[1-3]*", "--model", trained_bundle.path, "--no-gate")
    assert glob.returncode == 0 and "classified, 0 failed" in glob.stdout


def test_symlink_loop_and_non_ascii_names(trained_bundle, tmp_path):
    folder = tmp_path / "scans"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "loop").symlink_to(folder, target_is_directory=True)  # a folder that contains itself
    (folder / "Röntgen_胸部 1.jpeg").write_bytes(REAL.read_bytes())
    done = _cli("predict", folder, "--model", trained_bundle.path, "--format", "jsonl")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(rows) == 1 and rows[0]["path"].endswith("Röntgen_胸部 1.jpeg") and "probability" in rows[0]


@pytest.mark.data
def test_concurrent_explanations_do_not_mix(clf):
    """Grad-CAM hooks the shared network; 16 threads explaining two images get the sequential answers
    (without the lock this raises or mixes heatmaps)."""
    from concurrent.futures import ThreadPoolExecutor

    files = real_images("test", "NORMAL", 1) + real_images("test", "PNEUMONIA", 1)
    expected = [clf.explain(f).heatmap for f in files]
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda i: clf.explain(files[i % 2]).heatmap, range(32)))
    assert all(np.allclose(g, expected[i % 2], atol=1e-4) for i, g in enumerate(got))


@pytest.mark.data
def test_predict_output_survives_a_kill_and_resumes(trained_bundle, tmp_path):
    """`predict --output FILE` writes each result as it is made; killed with SIGKILL midway and run again
    with --resume, every input appears exactly once (a torn last line is cut off first)."""
    import signal
    import time

    folder = tmp_path / "in"
    folder.mkdir()
    for label in ("NORMAL", "PNEUMONIA"):
        for f in real_images("train", label, 60):  # 15 batches of 8: the kill after 40 rows leaves most to resume
            os.symlink(f, folder / f.name)
    inputs = sorted(str(p) for p in folder.iterdir())
    out = tmp_path / "results.jsonl"
    cmd = [sys.executable, "-m", "pneumoscan.cli", "predict", str(folder), "--model", str(trained_bundle.path)]
    cmd += ["--engine", "torch", "--output", str(out), "--quiet", "--no-gate"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.is_file() or out.read_bytes().count(b"\n") < 40):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = out.read_bytes().count(b"\n")  # results only: the run's settings are in the sidecar
    assert 40 <= written < len(inputs), "the run was not interrupted midway"
    with open(out, "ab") as f:
        f.write(b'{"path": "torn')  # as if killed in the middle of a line
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "add --resume" in refused.stderr  # never overwritten by accident
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{written} already in the file" in done.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    head = json.loads((tmp_path / "results.jsonl.pneumoscan.json").read_text())
    assert head["weights_sha256"] == trained_bundle.config["weights_sha256"]
    assert sorted(r["path"] for r in rows) == inputs and all("probability" in r for r in rows)


def test_predict_streams_csv_and_resumes_by_escaped_names(trained_bundle, tmp_path):
    """CSV cells of formula-like names carry a leading ' and --resume still recognises them."""
    import csv
    import shutil

    for name in ("=a.jpeg", "b.jpeg"):
        shutil.copyfile(REAL, tmp_path / name)
    cmd = [sys.executable, "-m", "pneumoscan.cli", "predict", "--model", str(trained_bundle.path), "--output", "r.csv"]
    first = subprocess.run(cmd + ["=a.jpeg"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    again = subprocess.run(cmd + ["--resume", "."], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert again.returncode == 0 and "1 classified" in again.stdout, again.stdout + again.stderr
    with open(tmp_path / "r.csv", newline="") as f:
        rows = list(csv.DictReader(f))  # a plain header row, then the results
    assert [r["path"] for r in rows] == ["'=a.jpeg", "b.jpeg"]
