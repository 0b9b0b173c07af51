import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from pneumoscan.bundle import load_bundle
from pneumoscan.errors import ConfigError
from pneumoscan.training import TrainConfig, train


def test_run_folder_holds_everything(trained_bundle):
    run = trained_bundle.path.parent
    for name in ("config.json", "history.csv", "curves.png", "model/model.safetensors", "model/config.json",
                 "model/metrics.json", "model/MODEL_CARD.md", "model/training_curves.png"):
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
    from pneumoscan.evaluation import evaluate

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
        train(TrainConfig(data=str(small_data), out=str(out), epochs=1, limit=24, progress=False, seed=5))
        return open(out / "history.csv").read().splitlines()[1].split(",")

    a, b = run(tmp_path / "a"), run(tmp_path / "b")
    keep = [i for i, k in enumerate(open(tmp_path / "a" / "history.csv").readline().strip().split(","))
            if k not in ("epoch_seconds", "train_images_per_s")]
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
    cmd = [sys.executable, "-m", "pneumoscan.cli", "train", "--data", str(small_data), "--out", str(out),
           "--epochs", "1", "--fine-tune-epochs", "1", "--unfreeze", "2", "--limit", "24", "--devices", "2", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "GLOBAL_RANK: 1" in done.stderr + done.stdout
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert [r["phase"] for r in rows] == ["head", "fine_tune"]
    assert np.isfinite(float(rows[-1]["val_auc"]))
    load_bundle(out / "model")
