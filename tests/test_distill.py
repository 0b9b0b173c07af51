"""Distillation (``train --teacher``): the loss, the teacher's cached probabilities, the recorded teacher."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumoscan.io.dataset import load_split, stratified_subset
from pneumoscan.model.store import resolve_model

SHIPPED = resolve_model("default")  # the bundled model as teacher (any bundle teaches)


def _bce(logit: float, target: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def test_distillation_loss_is_the_formula_and_listens_to_the_teacher():
    from pneumoscan.training.distill import distillation_loss

    logits = [2.0, -1.0, 0.5, -0.2]
    labels = [1.0, 0.0, 1.0, 0.0]
    teacher = [0.9, 0.6, 0.2, 0.05]
    weights = (1.5, 0.75)  # NORMAL, PNEUMONIA
    a, eps = 0.3, 0.1

    def smooth(t):
        return t * (1 - eps) + 0.5 * eps

    label_term = np.mean([weights[int(y)] * _bce(z, smooth(y)) for z, y in zip(logits, labels)])
    teacher_term = np.mean([_bce(z, smooth(p)) for z, p in zip(logits, teacher)])
    by_hand = (1 - a) * label_term + a * teacher_term

    t = {k: torch.tensor(v) for k, v in dict(z=logits, y=labels, p=teacher, w=weights).items()}
    loss = distillation_loss(t["z"], t["y"], t["w"], t["p"], a, eps)
    assert float(loss) == pytest.approx(by_hand, rel=1e-6)
    plain = distillation_loss(t["z"], t["y"], t["w"], None, a, eps)
    assert float(plain) == pytest.approx(label_term, rel=1e-6)
    assert abs(float(loss) - float(plain)) > 0.05  # the teacher disagrees with the labels here: it counts
    assert float(distillation_loss(t["z"], t["y"], t["w"], t["p"], 0.0, eps)) == pytest.approx(label_term, rel=1e-6)


def test_weighted_rows_give_a_logistic_regression_the_same_loss():
    """soft_rows turns the distillation loss into weighted rows: their weighted log loss is n times the loss."""
    from pneumoscan.training.distill import distillation_loss, soft_rows

    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3))
    y = np.array([0, 1, 1, 0, 1, 1])
    teacher = np.array([0.2, 0.9, 0.4, 0.6, 0.99, 0.7])
    weights, a, coef = (1.5, 0.75), 0.4, np.array([0.5, -1.0, 2.0])
    xs, ys, ws = soft_rows(x, y, weights, teacher, a)
    z = xs @ coef
    rows_loss = sum(w * _bce(zi, yi) for w, zi, yi in zip(ws, z, ys))
    loss = distillation_loss(
        torch.tensor(x @ coef), torch.tensor(y, dtype=torch.float64), torch.tensor(weights), torch.tensor(teacher), a
    )
    assert rows_loss == pytest.approx(len(y) * float(loss), rel=1e-9)


@pytest.mark.data
def test_teacher_probabilities_are_the_classifiers_and_are_computed_once(small_data, tmp_path, monkeypatch):
    from pneumoscan.inference import classifier
    from pneumoscan.training.distill import Teacher

    samples = stratified_subset(load_split(small_data, "train"), 4)
    teacher = Teacher.load(SHIPPED)
    p, kept, errors = teacher.probabilities(samples, progress=False, cache=tmp_path)
    assert not errors and kept == samples
    direct = classifier.Classifier.load(SHIPPED, gate=False, fp32=True).predict([s.path for s in samples])
    assert p == pytest.approx([r.probability for r in direct], abs=1e-6)
    assert [s.label for s in samples] == [0] * 4 + [1] * 4 and p[4:].mean() > p[:4].mean()

    def no_teacher_run(*args, **kwargs):
        raise AssertionError("the cached probabilities were computed again")

    monkeypatch.setattr(classifier, "Classifier", no_teacher_run)
    again, kept_again, _ = teacher.probabilities(samples[2:], progress=False, cache=tmp_path)
    assert kept_again == samples[2:] and again == pytest.approx(p[2:])
    assert len(list(tmp_path.glob(f"teacher-{teacher.digest[:16]}-*.safetensors"))) == 1


@pytest.mark.data
def test_a_student_that_only_hears_the_teacher_learns_what_it_says(small_data):
    """A = 1 with a teacher that contradicts every label: both frozen-feature heads learn the contradiction
    (the teacher's target is really what they fit), while A = 0 learns the labels."""
    from pneumoscan.core import metrics as M
    from pneumoscan.training.features import frozen_features
    from pneumoscan.training.frozen import fit_logistic, fit_mlp, head_logits

    samples = stratified_subset(load_split(small_data, "train"), 20)
    x, kept, _ = frozen_features("efficientnet_lite0", samples, 224, progress=False)
    y = np.array([s.label for s in kept])
    contrary = np.where(y == 1, 0.1, 0.9)
    groups = [s.patient for s in kept]
    for weight, above in ((0.0, True), (1.0, False)):
        mlp = fit_mlp(x, y, 128, 0.2, 0, contrary, weight)
        logistic, _ = fit_logistic(x, y, groups, 0, contrary, weight)
        for state in (mlp, logistic):
            auc = M.roc_auc(y, head_logits(state, x))
            assert (auc > 0.9) if above else (auc < 0.1), (weight, auc)


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "pneumoscan.cli", *map(str, args)], capture_output=True, text=True, timeout=600
    )


@pytest.mark.data
def test_train_with_the_shipped_bundle_as_teacher_records_it_and_writes_a_working_bundle(small_data, tmp_path):
    from pneumoscan.inference.classifier import Classifier
    from pneumoscan.model.backbones import sha256_file

    out = tmp_path / "run"  # at 64 px: the teacher's record and a working student, not its quality (224 costs 12x)
    done = _cli(
        "train", "--data", small_data, "--out", out, "--teacher", SHIPPED, "--teacher-weight", "0.7",
        "--epochs", "1", "--fine-tune-epochs", "0", "--limit", "12", "--image-size", "64", "--quiet",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    config = json.loads((out / "model" / "config.json").read_text())
    teacher = config["training"]["teacher"]
    assert teacher["config_sha256"] == sha256_file(SHIPPED / "config.json")
    assert teacher["weights_sha256"] == json.loads((SHIPPED / "config.json").read_text())["weights_sha256"]
    assert teacher["weight"] == 0.7 and Path(teacher["path"]) == SHIPPED.resolve()
    assert config["training"]["recipe"]["teacher_weight"] == 0.7
    assert json.loads((out / "config.json").read_text())["teacher_record"] == teacher  # checked on --resume
    assert "Distilled from the bundle" in (out / "model" / "MODEL_CARD.md").read_text()
    images = [s.path for s in stratified_subset(load_split(small_data, "test"), 3)]
    results = Classifier.load(out / "model", gate=False).predict(images)
    assert all(r.ok and 0 <= r.probability <= 1 for r in results)


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--teacher", "{tmp}"], "--teacher {tmp}: not a model bundle (no config.json)"),
        (["--teacher", "{tmp}/missing"], "--teacher {tmp}/missing: not a model bundle"),
        (["--teacher-weight", "0.3"], "--teacher-weight needs --teacher BUNDLE"),
        (["--teacher", str(SHIPPED), "--teacher-weight", "1.5"], "--teacher-weight must be >= 0 and <= 1"),
    ],
)
@pytest.mark.data
def test_a_bad_teacher_is_one_line_and_exit_2(small_data, tmp_path, extra, fragment):
    out = tmp_path / "run"
    done = _cli("train", "--data", small_data, "--out", out, *[e.format(tmp=tmp_path) for e in extra])
    assert done.returncode == 2, done.stderr
    assert fragment.format(tmp=tmp_path) in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not out.exists()  # refused before the run folder is made


def test_resume_refuses_a_teacher_that_changed_since_the_run_started(tmp_path):
    from pneumoscan.core.errors import ConfigError
    from pneumoscan.training.distill import Teacher
    from pneumoscan.training.run import check_same_teacher

    teacher = Teacher.load(SHIPPED)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"teacher_record": teacher.record()}))
    check_same_teacher(config, teacher)  # the same teacher: resumes
    config.write_text(json.dumps({"teacher_record": {**teacher.record(), "config_sha256": "0" * 64}}))
    with pytest.raises(ConfigError, match="not the teacher this run started with"):
        check_same_teacher(config, teacher)
