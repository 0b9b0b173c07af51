"""Training: a frozen-backbone phase, then optional fine-tuning of the last blocks.

Each phase keeps the best weights by validation AUC and stops early when it stalls. The frozen
prefix of the backbone never changes within a phase, so it runs as a traced, frozen TorchScript
module (convolution and batch norm fused, oneDNN kernels): 2-3x faster than eager on a CPU,
and autograd only sees the trainable tail and head. On GPUs the prefix runs eagerly.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC

from pneumoscan.core.errors import ConfigError
from pneumoscan.core.text import printable
from pneumoscan.io.dataset import (
    fits_in_memory,
    load_images,
    recipe_splits,
    require_train_folder,
    stratified_subset,
    summarize,
)
from pneumoscan.io.fileio import read_json_object, write_json
from pneumoscan.model.bundle import Bundle, save_bundle
from pneumoscan.model.heads.base import FitData
from pneumoscan.model.heads.registry import HEADS
from pneumoscan.model.networks import create_model, predict_logits, predict_outputs
from pneumoscan.training.augment import ImageDataset
from pneumoscan.training.distill import Teacher, aligned, balanced_class_weights, distillation_loss
from pneumoscan.training.heads import fit_heads_on
from pneumoscan.training.recipe import TrainConfig
from pneumoscan.training.run import bundle_config, check_same_teacher, operating_point, run_config


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def compile_frozen(module: nn.Module, example: torch.Tensor) -> nn.Module:
    """A frozen module as fused, frozen TorchScript for CPU inference; eager where that fails."""
    module = module.eval()
    if example.device.type != "cpu":
        return module
    try:
        with torch.no_grad():
            return torch.jit.optimize_for_inference(
                torch.jit.freeze(torch.jit.trace(module, example, check_trace=False))
            )
    except Exception:  # noqa: BLE001 - an exotic backbone still trains, only slower
        return module


class LitClassifier(L.LightningModule):
    """The network, its loss and its metrics, for one phase at a time (:meth:`configure_phase`)."""

    def __init__(
        self,
        net,
        class_weights: tuple[float, float],
        label_smoothing: float,
        image_size: int,
        teacher_weight: float = 0.0,
    ):
        super().__init__()
        self.net = net
        self.image_size = image_size
        self.register_buffer("class_weights", torch.tensor(class_weights, dtype=torch.float32))
        self.label_smoothing = label_smoothing
        self.teacher_weight = teacher_weight  # A of distillation (batches then carry the teacher's probability)
        self.train_auc, self.val_auc = BinaryAUROC(), BinaryAUROC()
        self.train_acc, self.val_acc = BinaryAccuracy(), BinaryAccuracy()
        self.configure_phase(Phase("head", 1, 0, 1e-3, "constant"))

    def configure_phase(self, phase: Phase) -> None:
        self.split = self.net.set_trainable(phase.unfreeze)
        self.lr, self.schedule = phase.lr, phase.schedule
        self.__dict__["_trunk"] = None  # not a submodule: DDP and checkpoints never see it

    def _frozen_prefix(self) -> nn.Module:
        return nn.Sequential(self.net.normalize, *self.net.body[: self.split])

    def on_fit_start(self) -> None:
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.trainer.world_size))
        example = torch.zeros((2, 1, self.image_size, self.image_size), dtype=torch.uint8, device=self.device)
        self.__dict__["_trunk"] = compile_frozen(self._frozen_prefix(), example)

    def on_train_epoch_start(self) -> None:
        self._frozen_prefix().eval()  # frozen batch norms keep their ImageNet statistics

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trunk = self.__dict__["_trunk"] or self._frozen_prefix().eval()
        with torch.no_grad():
            features = trunk(x)
        return self.net.head(self.net.body[self.split :](features)).squeeze(1)

    def _loss(self, logits, y, teacher, training: bool):
        if not training:
            return F.binary_cross_entropy_with_logits(logits, y)
        return distillation_loss(logits, y, self.class_weights, teacher, self.teacher_weight, self.label_smoothing)

    def _step(self, batch, stage: str):
        x, y, *teacher = batch  # a distilled run's training batches carry the teacher's probabilities
        logits = self(x)
        loss = self._loss(logits, y, teacher[0] if teacher else None, stage == "train")
        p = torch.sigmoid(logits.detach())
        auc, acc = (self.train_auc, self.train_acc) if stage == "train" else (self.val_auc, self.val_acc)
        auc.update(p, y.int())
        acc.update(p, y.int())
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(y))
        self.log(f"{stage}_auc", auc, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{stage}_acc", acc, on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=self.lr)
        if self.schedule == "constant":
            return optimizer
        steps = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.lr, total_steps=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class History(L.Callback):
    """One row per epoch (metrics, training throughput, wall time), written after every epoch."""

    def __init__(self, run: RunState, phase: str, n_train: int):
        self.run, self.phase, self.n_train = run, phase, n_train

    def on_train_epoch_start(self, trainer, module):
        self.start = time.perf_counter()
        self.train_seconds = None

    def on_validation_epoch_start(self, trainer, module):
        if trainer.training or self.train_seconds is None:
            self.train_seconds = time.perf_counter() - self.start

    def on_train_epoch_end(self, trainer, module):
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        train_seconds = self.train_seconds or (time.perf_counter() - self.start)
        self.run.history.append(
            {
                "phase": self.phase,
                "epoch": len(self.run.history) + 1,
                **{k: round(metrics[k], 5) for k in sorted(metrics)},
                "train_images_per_s": round(self.n_train / train_seconds, 2),
                "epoch_seconds": round(time.perf_counter() - self.start, 1),
            }
        )
        self.run.save_history()  # after every epoch, so a run can be watched


class SafeCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file, then renamed (a kill never leaves half a file), and
    read back without unpickling anything but tensors and plain containers: a run folder from someone
    else cannot run code here."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return read_checkpoint(Path(path))


def read_checkpoint(path: Path) -> dict:
    """A checkpoint as tensors and plain data (``torch.load(weights_only=True)``), or one line saying why not."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickled code, a torn file, not a checkpoint at all
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path}: refused as a checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ConfigError(f"{path}: not a training checkpoint (no state_dict)")
    return checkpoint


@dataclass(frozen=True)
class Phase:
    name: str  # "head" or "fine_tune"
    epochs: int
    unfreeze: int
    lr: float
    schedule: str


def phases(cfg: TrainConfig) -> list[Phase]:
    """Phase 1 trains the head on a frozen backbone; phase 2 (optional) also the last blocks."""
    out = [Phase("head", cfg.epochs, 0, cfg.lr, "constant")]
    if cfg.fine_tune_epochs:
        out.append(Phase("fine_tune", cfg.fine_tune_epochs, cfg.unfreeze, cfg.fine_tune_lr, cfg.schedule))
    return out


class RunState:
    """A run folder's bookkeeping: ``config.json``, ``history.csv``, ``state.json`` (finished phases
    with their best score and checkpoint, seconds per phase) and ``checkpoints/``. Everything read back
    on ``--resume`` is validated: checkpoints must lie in this run's ``checkpoints/`` folder."""

    def __init__(self, out: Path, resume: bool):
        self.out = out
        self.checkpoints = out / "checkpoints"
        self.state = self._read_state() if resume else {}
        self.history = _read_history(out / "history.csv") if resume else []
        self.seconds: dict[str, float] = dict(self.state.get("seconds", {}))

    def _read_state(self) -> dict:
        path = self.out / "state.json"
        if not path.is_file():
            return {}
        state = read_json_object(path, "run state")
        done = state.get("done", {})
        seconds = state.get("seconds", {})
        valid_done = isinstance(done, dict) and all(
            isinstance(v, list) and len(v) == 2 and isinstance(v[0], (int, float)) and isinstance(v[1], str)
            for v in done.values()
        )
        valid_seconds = isinstance(seconds, dict) and all(isinstance(v, (int, float)) for v in seconds.values())
        if not (valid_done and valid_seconds):
            raise ConfigError(f"{path}: not a valid run state (done: phase -> [score, checkpoint]; seconds)")
        return state

    def finished(self, phase: str) -> tuple[float, Path] | None:
        """(best score, best checkpoint) of a phase finished before an interruption."""
        if phase not in self.state.get("done", {}):
            return None
        score, checkpoint = self.state["done"][phase]
        return float(score), self.checkpoints / Path(checkpoint).name  # only ever inside this run

    def last_checkpoint(self, phase: str) -> Path | None:
        last = self.checkpoints / f"{phase}-last.ckpt"
        return last if last.is_file() else None

    def rewind(self, phase: str, resume_from: Path | None) -> None:
        """Forget history rows of ``phase`` logged after ``resume_from`` (those epochs run again)."""
        epochs_done = int(read_checkpoint(resume_from).get("epoch", -1)) + 1 if resume_from else 0
        kept = [r for r in self.history if r["phase"] == phase][:epochs_done]
        self.history[:] = [r for r in self.history if r["phase"] != phase] + kept

    def finish_phase(self, phase: str, score: float, checkpoint: str, seconds: float) -> None:
        self.seconds[phase] = round(self.seconds.get(phase, 0) + seconds, 1)
        self.state.setdefault("done", {})[phase] = [score, Path(checkpoint).name]
        self.state["seconds"] = self.seconds
        write_json(self.out / "state.json", self.state)

    def save_history(self) -> None:
        write_history(self.out / "history.csv", self.history)


def write_history(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for row in rows for k in row}, key=lambda k: (k not in ("phase", "epoch"), k))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def _read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []

    def number(text: str):
        try:
            return int(text)
        except ValueError:
            try:
                return float(text)
            except ValueError:
                raise ConfigError(f"{path}: not a history written by pneumoscan ({text[:40]!r})") from None

    with open(path, newline="") as f:
        rows = [{k: v if k == "phase" else number(v) for k, v in row.items() if v} for row in csv.DictReader(f)]
    if any(not isinstance(r.get("phase"), str) or "epoch" not in r for r in rows):
        raise ConfigError(f"{path}: not a history written by pneumoscan (phase and epoch per row)")
    return rows


def _trainer(cfg: TrainConfig, run: RunState, phase: Phase, history: History):
    """A Lightning trainer for one phase, and its best-by-validation-AUC checkpoint callback."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    best = ModelCheckpoint(
        dirpath=run.checkpoints,
        filename=f"{phase.name}-best",
        monitor="val_auc",
        mode="max",
        save_top_k=1,
        save_weights_only=True,
        enable_version_counter=False,
    )
    every_epoch = ModelCheckpoint(
        dirpath=run.checkpoints, filename=f"{phase.name}-last", save_top_k=1, enable_version_counter=False
    )  # full state, for --resume
    trainer = L.Trainer(
        max_epochs=phase.epochs,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        precision=cfg.precision,
        strategy="ddp" if cfg.devices * cfg.num_nodes > 1 else "auto",
        plugins=[SafeCheckpointIO()],
        logger=CSVLogger(run.out, name="logs", version=phase.name),
        callbacks=[best, every_epoch, EarlyStopping("val_auc", mode="max", patience=cfg.patience), history],
        enable_progress_bar=cfg.progress,
        num_sanity_val_steps=0,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    return trainer, best


@dataclass
class TrainingData:
    train_set: ImageDataset
    val_set: ImageDataset
    train_samples: list
    val_samples: list
    skipped: list[str]
    in_memory: bool


def _is_rank_zero() -> bool:
    """Whether this process is global rank 0, before Lightning has set up: torchrun and SLURM say so with
    RANK / SLURM_PROCID, Lightning's own launcher with LOCAL_RANK and NODE_RANK."""
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key]) == 0
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def load_training_data(cfg: TrainConfig, rank_zero: bool, teacher: Teacher | None = None) -> TrainingData:
    """Train and validation images (validation carved by patient), decoded once; unreadable ones skipped.
    With a teacher, each training image also carries the teacher's probability (computed or cached first)."""
    train_samples, val_samples = recipe_splits(cfg.data, cfg.recorded())
    train_samples = stratified_subset(train_samples, cfg.limit, cfg.seed)
    val_samples = stratified_subset(val_samples, None if cfg.limit is None else max(8, cfg.limit // 4), cfg.seed)
    in_memory = cfg.cache == "memory" or (cfg.cache == "auto" and fits_in_memory(len(train_samples), cfg.image_size))
    show = cfg.progress and rank_zero
    soft, scored, teacher_errors = None, train_samples, []
    if teacher is not None:
        soft, scored, teacher_errors = teacher.probabilities(train_samples, show)
    x_train, train_samples, train_errors = load_images(scored, cfg.image_size, show, "loading train", keep=in_memory)
    x_val, val_samples, val_errors = load_images(val_samples, cfg.image_size, show, "loading val")
    train_errors = teacher_errors + train_errors
    if rank_zero:
        for line in train_errors + val_errors:
            print(f"skipped {printable(line)}")
    y_train = [s.label for s in train_samples]
    if len(set(y_train)) < 2 or len({s.label for s in val_samples}) < 2:
        raise ConfigError(f"{cfg.data}: training and validation sets need readable images of both classes")
    if not in_memory:  # streamed from disk: loader processes decode while the model trains
        x_train = [s.path for s in train_samples]
    soft = None if soft is None else aligned(soft, scored, train_samples)
    return TrainingData(
        ImageDataset(x_train, y_train, cfg.augmentation, cfg.image_size, soft_targets=soft),
        ImageDataset(x_val, [s.label for s in val_samples]),
        train_samples,
        val_samples,
        train_errors + val_errors,
        in_memory,
    )


def _loaders(cfg: TrainConfig, data: TrainingData):
    workers = cfg.workers or (0 if data.in_memory else os.cpu_count() or 1)
    train_loader = torch.utils.data.DataLoader(
        data.train_set,
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(cfg.seed),
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    val_loader = torch.utils.data.DataLoader(data.val_set, batch_size=cfg.batch_size)  # always in memory
    return train_loader, val_loader


def run_phase(cfg: TrainConfig, run: RunState, module: LitClassifier, phase: Phase, loaders, n_train: int):
    """Train one phase (or take its result from an interrupted run): ``(best score, best checkpoint)``."""
    module.configure_phase(phase)
    if (finished := run.finished(phase.name)) is not None:
        return finished
    resume_from = run.last_checkpoint(phase.name) if cfg.resume else None
    run.rewind(phase.name, resume_from)
    trainer, best = _trainer(cfg, run, phase, History(run, phase.name, n_train))
    started = time.perf_counter()
    trainer.fit(module, *loaders, ckpt_path=str(resume_from) if resume_from else None, weights_only=True)
    score = float(best.best_model_score) if best.best_model_score is not None else -1.0
    if _is_rank_zero():
        run.finish_phase(phase.name, score, best.best_model_path, time.perf_counter() - started)
    return score, Path(best.best_model_path)


def train(cfg: TrainConfig) -> Bundle | None:
    """Train, keep the best weights, pick threshold and temperature on validation, write the run folder.

    Returns the bundle on the main process (``None`` on other DDP ranks)."""
    cfg.check()
    require_train_folder(cfg.data)  # before the run folder is made
    teacher = Teacher.load(cfg.teacher, cfg.teacher_weight) if cfg.teacher else None
    if cfg.frozen_features:
        from pneumoscan.training.frozen import train_frozen

        return train_frozen(cfg, teacher)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no banners about GPUs and loggers
    run = RunState(Path(cfg.out), cfg.resume)
    rank_zero = _is_rank_zero()
    if cfg.resume:
        check_same_teacher(run.out / "config.json", teacher)
    elif rank_zero:
        write_json(run.out / "config.json", run_config(cfg, teacher))
    seed_everything(cfg.seed)
    data = load_training_data(cfg, rank_zero, teacher)
    net = create_model(cfg.backbone, weights=cfg.weights, dropout=cfg.dropout, image_size=cfg.image_size)
    module = LitClassifier(
        net,
        balanced_class_weights([s.label for s in data.train_samples], cfg.class_weights),
        cfg.label_smoothing,
        cfg.image_size,
        teacher.weight if teacher else 0.0,
    )
    loaders = _loaders(cfg, data)
    best_score, best_state = -1.0, None
    started = time.perf_counter()
    for phase in phases(cfg):
        score, checkpoint = run_phase(cfg, run, module, phase, loaders, len(data.train_set))
        if score > best_score:
            best_score, best_state = score, read_checkpoint(checkpoint)["state_dict"]
        module.load_state_dict(best_state)  # each phase starts from, and the run ends with, the best so far
    if not rank_zero:
        return None
    return finish_run(cfg, run, net, data, best_score, time.perf_counter() - started, teacher)


def _training_images(data: TrainingData, size: int, progress: bool = False) -> tuple[np.ndarray, list]:
    """Training images in memory (decoded again, unaugmented, when training streamed them from disk)."""
    if data.in_memory:
        return data.train_set.images.numpy(), data.train_samples
    images, samples, _ = load_images(data.train_samples, size, progress, "decoding train for the heads")
    return images, samples


def _step(show: bool, text: str) -> None:
    """A named phase after the epochs, on stderr where progress is shown (each loop over images has a bar)."""
    if show:
        print(text, file=sys.stderr, flush=True)


def finish_run(
    cfg: TrainConfig, run: RunState, net, data: TrainingData, best_score: float, wall: float, teacher=None
) -> Bundle:
    """Fit the operating point on validation, then write curves, metrics and the bundle."""
    from pneumoscan.report.figures import plot_training_curves

    net = net.cpu()  # trained on whatever accelerator; fitted, saved and exported from the CPU
    show = cfg.progress
    _step(show, "after training: temperature and threshold on the validation images")
    logits = predict_logits(net, data.val_set.images.numpy(), progress=show)
    temperature, threshold, rule, validation = operating_point(cfg, data.val_samples, logits)

    _step(show, "after training: training curves")
    run.save_history()
    curves = plot_training_curves(run.history, run.out / "curves.png")
    speeds = {phase: [r["train_images_per_s"] for r in run.history if r["phase"] == phase] for phase in run.seconds}
    training = {
        "data": str(cfg.data),
        "train": summarize(data.train_samples),
        "validation": summarize(data.val_samples),
        "recipe": cfg.recorded(),
        "best_val_auc": best_score,
        "skipped_unreadable": data.skipped,
        "wall_seconds": round(wall, 1),
        "phase_seconds": run.seconds,
        "train_images_per_s_median": {k: float(np.median(v)) for k, v in speeds.items() if v},
        "epochs_run": len(run.history),
        **({"teacher": teacher.record()} if teacher else {}),
    }
    config = bundle_config(cfg, net.hidden, threshold, rule, temperature, training)
    _step(show, f"after training: the feature heads ({', '.join(HEADS)}) on this network's features")
    train_images, train_samples = _training_images(data, cfg.image_size, show)
    val_images = data.val_set.images.numpy()
    fitting = FitData(
        cfg.seed,
        cfg.image_size,
        train_samples,
        data.val_samples,
        lambda images: predict_outputs(net, images, progress=show, desc="features")[1],
        train_images=train_images,
        val_images=val_images,
    )
    extras, reports, _ = fit_heads_on(fitting, progress=show)  # the feature heads (feature_heads.HEADS)
    validation.update(reports)
    if curves:
        extras["training_curves.png"] = curves.read_bytes()
    _step(show, f"after training: writing the bundle to {printable(run.out / 'model')}")
    bundle = save_bundle(run.out / "model", net, config, {"validation": validation}, extras=extras)
    print(
        json.dumps(
            {
                "run": str(run.out),
                "skipped_unreadable": len(data.skipped),
                "best_val_auc": round(best_score, 4),
                "threshold": round(threshold, 4),
                "temperature": round(temperature, 3),
                "wall_seconds": round(wall, 1),
                "train_images_per_s": training["train_images_per_s_median"],
            }
        )
    )
    return bundle
