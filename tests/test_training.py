import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from pneumoscan.core.errors import ConfigError
from pneumoscan.model.store import load_bundle
from pneumoscan.training.recipe import TrainConfig
from pneumoscan.training.trainer import train

# Tests of a mechanism (seeding, DDP, torchrun, resume, streaming, skipping, progress) train at this size: the
# network's cost per image falls with its area (about 12x from 224 px), and so does a small run's largest
# step, the input gate's features of its validation films under every acquisition perturbation. The session's
# ``trained_bundle`` stays at 224 px: the tests above read its quality on held-out test images.
MECHANISM_SIZE = 64


def mechanism_run(data, out, **options):
    """One frozen epoch at MECHANISM_SIZE, quiet unless ``progress`` is given: a run for a mechanism's test."""
    options = {"progress": False, **options}
    return train(
        TrainConfig(data=str(data), out=str(out), epochs=1, fine_tune_epochs=0, image_size=MECHANISM_SIZE, **options)
    )


def test_run_folder_holds_everything(trained_bundle):
    run = trained_bundle.path.parent
    for name in (
        "config.json",
        "history.csv",
        "curves.png",
        "model/model.safetensors",
        "model/config.json",
        "model/metrics.json",
        "model/MODEL_CARD.md",
        "model/training_curves.png",
    ):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader(open(run / "history.csv")))
    assert len(rows) == 2 and {"train_auc", "val_auc", "train_loss", "val_loss", "train_images_per_s"} <= set(rows[0])
    bundle = load_bundle(trained_bundle.path)
    assert 0 < bundle.threshold < 1 and bundle.temperature > 0
    training = bundle.config["training"]
    assert training["train"]["images"] + training["validation"]["images"] == 200  # validation carved by patient
    assert bundle.metrics["validation"]["n"] > 0 and "ci95" in bundle.metrics["validation"]
    assert "not a medical device" in (trained_bundle.path / "MODEL_CARD.md").read_text()


def test_training_learns_and_evaluation_on_real_test_images_shows_it(trained_bundle, small_data, tmp_path):
    """End to end on real images: a broken pipeline (labels shuffled, misaligned predictions,
    wrong normalisation) would not reach this AUC on held-out test images."""
    from pneumoscan.evaluation.evaluate import evaluate

    summary = evaluate(small_data, "test", [str(trained_bundle.path)], tmp_path, n_resamples=200, progress=False)
    report = summary["models"][0]
    assert report["n"] == 80
    assert report["auc"] > 0.75
    assert json.loads((tmp_path / "metrics.json").read_text())["auc"] == pytest.approx(report["auc"])


def test_best_weights_by_validation_auc_are_kept(trained_bundle):
    rows = list(csv.DictReader(open(trained_bundle.path.parent / "history.csv")))
    best = max(float(r["val_auc"]) for r in rows)
    assert trained_bundle.config["training"]["best_val_auc"] == pytest.approx(best, abs=1e-4)


def test_seeded_cpu_runs_repeat(small_data, tmp_path):
    def run(out):
        mechanism_run(small_data, out, limit=24, seed=5)
        return open(out / "history.csv").read().splitlines()[1].split(",")

    a, b = run(tmp_path / "a"), run(tmp_path / "b")
    keep = [
        i
        for i, k in enumerate(open(tmp_path / "a" / "history.csv").readline().strip().split(","))
        if k not in ("epoch_seconds", "train_images_per_s")
    ]
    assert [a[i] for i in keep] == [b[i] for i in keep]


def test_bad_configurations(small_data, tmp_path):
    with pytest.raises(ConfigError, match="unknown backbone"):
        train(TrainConfig(data=str(small_data), out=str(tmp_path), backbone="vgg", limit=8, progress=False))
    with pytest.raises(ConfigError, match="data folder not found"):
        train(TrainConfig(data=str(tmp_path / "missing"), out=str(tmp_path), progress=False))
    with pytest.raises(ConfigError, match="--schedule"):
        train(TrainConfig(data=str(small_data), out=str(tmp_path), schedule="cosine", progress=False))


def test_fine_tuning_and_ddp_on_two_cpu_processes(small_data, tmp_path):
    """`--devices 2` runs DDP (gloo) with the same code; both phases complete and a bundle is written."""
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "pneumoscan.cli",
        "train",
        "--data",
        str(small_data),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--fine-tune-epochs",
        "1",
        "--unfreeze",
        "2",
        "--limit",
        "24",
        "--devices",
        "2",
        "--image-size",
        str(MECHANISM_SIZE),
        "--quiet",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "GLOBAL_RANK: 1" in done.stderr + done.stdout
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert [r["phase"] for r in rows] == ["head", "fine_tune"]
    assert np.isfinite(float(rows[-1]["val_auc"]))
    load_bundle(out / "model")


def _best_val_auc(run) -> float:
    return json.loads((run / "model" / "config.json").read_text())["training"]["best_val_auc"]


def test_resume_after_sigkill_mid_epoch(small_data, tmp_path):
    """A run killed with SIGKILL mid-epoch continues with --resume and ends where an uninterrupted run ends."""
    import signal
    import time

    args = [
        "train",
        "--data",
        str(small_data),
        "--epochs",
        "4",
        "--fine-tune-epochs",
        "0",
        "--limit",
        "60",
        "--seed",
        "3",
        "--image-size",
        str(MECHANISM_SIZE),
        "--quiet",
    ]
    cli = [sys.executable, "-m", "pneumoscan.cli"]
    full = subprocess.run(cli + args + ["--out", str(tmp_path / "full")], capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-1500:]
    assert "GPU available" not in full.stderr and "Tip:" not in full.stderr  # Lightning's banners are silenced

    killed = tmp_path / "killed"
    proc = subprocess.Popen(cli + args + ["--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "checkpoints" / "head-last.ckpt").is_file():
        time.sleep(0.05)
    time.sleep(0.3)  # into the next epoch
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    history = killed / "history.csv"
    assert len(list(csv.DictReader(open(history))) if history.is_file() else []) < 4  # killed with epochs to go
    assert not (killed / "model").exists()
    import torch

    for ckpt in (killed / "checkpoints").glob("*.ckpt"):  # a torn temporary file may remain; never a torn checkpoint
        assert "state_dict" in torch.load(ckpt, map_location="cpu", weights_only=False)

    resumed = subprocess.run(
        cli + ["train", "--resume", str(killed), "--quiet"], capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-1500:]
    rows = list(csv.DictReader(open(killed / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1)) and len(rows) == 4
    assert abs(_best_val_auc(killed) - _best_val_auc(tmp_path / "full")) <= 0.005


def test_resume_needs_a_run_folder(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "pneumoscan.cli", "train", "--resume", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "not a run folder to resume" in done.stderr


@pytest.mark.data
def test_unreadable_training_images_are_listed_and_skipped(tmp_path, capsys):
    from conftest import link_dataset

    root = link_dataset(tmp_path / "data", {"train": 20})
    (root / "train" / "NORMAL" / "IM-9999-0001.jpeg").write_bytes(b"broken")
    bundle = mechanism_run(root, tmp_path / "run")
    skipped = bundle.config["training"]["skipped_unreadable"]
    assert len(skipped) == 1 and "IM-9999-0001.jpeg" in skipped[0]
    assert "skipped" in capsys.readouterr().out


def test_images_stream_from_disk_when_they_do_not_fit(small_data, tmp_path):
    from pneumoscan.io.dataset import fits_in_memory

    assert fits_in_memory(5216, 224) and not fits_in_memory(10**9, 224)
    bundle = mechanism_run(small_data, tmp_path, limit=24, cache="disk", workers=2)
    rows = list(csv.DictReader(open(tmp_path / "history.csv")))
    assert len(rows) == 1 and 0.5 < float(rows[0]["val_auc"]) <= 1 and 0 < bundle.threshold < 1


def test_two_nodes_under_torchrun_train_one_bundle(small_data, tmp_path):
    """Two "nodes" on this machine (two torchrun processes, --nnodes 2 over localhost, gloo): one run, the
    same kind of bundle as one process, written by global rank 0 only."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    outs = [tmp_path / "node0", tmp_path / "node1"]

    def node(rank: int):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
        cmd += ["--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port)]
        cmd += ["-m", "pneumoscan.cli", "train", "--data", str(small_data), "--out", str(outs[rank])]
        cmd += [
            "--epochs",
            "1",
            "--fine-tune-epochs",
            "0",
            "--limit",
            "24",
            "--num-nodes",
            "2",
            "--accelerator",
            "cpu",
            "--image-size",
            str(MECHANISM_SIZE),
            "--quiet",
        ]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    procs = [node(0), node(1)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs[0][-1500:] + logs[1][-1500:]
    bundle = load_bundle(outs[0] / "model")
    assert bundle.config["training"]["recipe"]["num_nodes"] == 2 and 0 < bundle.threshold < 1
    rows = list(csv.DictReader(open(outs[0] / "history.csv")))
    assert len(rows) == 1 and np.isfinite(float(rows[0]["val_auc"]))
    assert not (outs[1] / "model").exists() and not (outs[1] / "config.json").exists()
    assert not (outs[1] / "checkpoints").exists()


def test_every_phase_after_the_epochs_is_named_with_a_bar_over_its_images(small_data, tmp_path, capfd):
    """After the last epoch (minutes on the full train split: validation logits, the gate's features of the
    training images, the subtype head, the bundle) each phase says what it does, and loops over images
    show a bar that reaches its count."""
    import re

    mechanism_run(small_data, tmp_path, limit=24, seed=1, progress=True)
    err = capfd.readouterr().err
    after = err[err.index("after training: temperature and threshold") :]
    for step in ("training curves", "the feature heads (gate, subtype)", "writing the bundle to"):
        assert f"after training: {step}" in after, after[-3000:]
    assert re.search(r"predicting: 100%[^\r\n]*\b(\d+)/\1\b", after), after[-3000:]
    bars = re.findall(r"features: 100%[^\r\n]*\b(\d+)/\1\b", after)
    assert bars and max(map(int, bars)) >= 24, after[-3000:]  # the gate reads the training images' features
    assert re.search(r"fitting heads: 100%[^\r\n]*\b2/2\b", after)
