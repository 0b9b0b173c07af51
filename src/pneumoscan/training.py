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
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .bundle import Bundle, save_bundle, write_json
from .data import (
    Augmentation,
    ImageDataset,
    fits_in_memory,
    load_images,
    stratified_subset,
    summarize,
    training_splits,
)
from .errors import ConfigError
from .models import IMAGENET_MEAN, IMAGENET_STD, create_model, predict_logits


@dataclass
class TrainConfig:
    data: str
    out: str
    backbone: str = "efficientnet_lite0"
    weights: str | None = "imagenet"
    image_size: int = 224
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    patience: int = 5
    fine_tune_epochs: int = 0
    unfreeze: int = 6
    fine_tune_lr: float = 1e-5
    schedule: str = "constant"
    class_weights: str = "balanced"
    label_smoothing: float = 0.0
    dropout: float = 0.2
    val_source: str = "patients"
    val_fraction: float = 0.1
    seed: int = 0
    devices: int = 1
    workers: int = 0
    cache: str = "auto"
    limit: int | None = None
    target_sensitivity: float | None = None
    augmentation: Augmentation = field(default_factory=Augmentation)
    progress: bool = True
    resume: bool = False

    @classmethod
    def from_run(cls, run_dir: str | Path, progress: bool = True) -> TrainConfig:
        """The configuration a run folder was started with, set to resume it."""
        path = Path(run_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{run_dir}: not a run folder to resume (no config.json)")
        saved = json.loads(path.read_text())
        saved["augmentation"] = Augmentation(**saved.get("augmentation", {}))
        known = set(cls.__dataclass_fields__) - {"out", "progress", "resume"}
        return cls(**{k: v for k, v in saved.items() if k in known}, out=str(run_dir), progress=progress, resume=True)

    def recorded(self) -> dict:
        """The settings that define the run, as written to config.json (not how it is watched or resumed)."""
        return {k: v for k, v in asdict(self).items() if k not in ("progress", "resume")}

    def check(self) -> None:
        if self.image_size < 32 or self.image_size > 1024:
            raise ConfigError(f"--image-size must be between 32 and 1024, got {self.image_size}")
        if self.epochs < 1 or self.fine_tune_epochs < 0 or self.batch_size < 1 or self.devices < 1:
            raise ConfigError("--epochs, --batch-size and --devices must be at least 1, --fine-tune-epochs at least 0")
        if self.schedule not in ("constant", "onecycle"):
            raise ConfigError(f"--schedule must be 'constant' or 'onecycle', got {self.schedule!r}")
        if self.cache not in ("auto", "memory", "disk"):
            raise ConfigError(f"--cache must be 'auto', 'memory' or 'disk', got {self.cache!r}")
        if self.class_weights not in ("balanced", "none"):
            raise ConfigError(f"--class-weights must be 'balanced' or 'none', got {self.class_weights!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError("--label-smoothing must be in [0, 1)")


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
            return torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(module, example)))
    except Exception:  # noqa: BLE001 - an exotic backbone still trains, only slower
        return module


def _lit_class():
    """The LightningModule class, built on first use so that importing this file does not import Lightning."""
    import lightning as L
    from torchmetrics.classification import BinaryAccuracy, BinaryAUROC

    class _LitClassifier(L.LightningModule):
        def __init__(self, net, class_weights: tuple[float, float], label_smoothing: float, image_size: int):
            super().__init__()
            self.net = net
            self.image_size = image_size
            self.register_buffer("class_weights", torch.tensor(class_weights, dtype=torch.float32))
            self.label_smoothing = label_smoothing
            self.train_auc, self.val_auc = BinaryAUROC(), BinaryAUROC()
            self.train_acc, self.val_acc = BinaryAccuracy(), BinaryAccuracy()
            self.configure_phase(unfreeze=0, lr=1e-3, schedule="constant")

        def configure_phase(self, unfreeze: int, lr: float, schedule: str) -> None:
            self.split = self.net.set_trainable(unfreeze)
            self.lr, self.schedule = lr, schedule
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

        def _loss(self, logits, y, training: bool):
            if not training:
                return F.binary_cross_entropy_with_logits(logits, y)
            target = y * (1 - self.label_smoothing) + 0.5 * self.label_smoothing
            weights = self.class_weights[y.long()]
            return (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weights).mean()

        def _step(self, batch, stage: str):
            x, y = batch
            logits = self(x)
            loss = self._loss(logits, y, stage == "train")
            p = torch.sigmoid(logits.detach())
            auc, acc = (self.train_auc, self.train_acc) if stage == "train" else (self.val_auc, self.val_acc)
            auc.update(p, y.int())
            acc.update(p, y.int())
            self.log(
                f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(y)
            )
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

    return _LitClassifier


def write_history(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for row in rows for k in row}, key=lambda k: (k not in ("phase", "epoch"), k))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def _history_callback(phase: str, n_train: int, rows: list, path: Path):
    import lightning as L

    class History(L.Callback):
        """One row per epoch: metrics, training throughput and wall time."""

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
            rows.append(
                {
                    "phase": phase,
                    "epoch": len(rows) + 1,
                    **{k: round(metrics[k], 5) for k in sorted(metrics)},
                    "train_images_per_s": round(n_train / train_seconds, 2),
                    "epoch_seconds": round(time.perf_counter() - self.start, 1),
                }
            )
            write_history(path, rows)  # after every epoch, so a run can be watched

    return History()


def _atomic_checkpoint_io():
    """Lightning checkpoints written to a temporary file, then renamed: a kill never leaves half a file."""
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            torch.save(checkpoint, tmp)
            os.replace(tmp, path)

    return AtomicCheckpointIO()


def _read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []

    def number(text: str):
        try:
            return int(text)
        except ValueError:
            return float(text)

    return [
        {k: v if k == "phase" else number(v) for k, v in row.items() if v != ""} for row in csv.DictReader(open(path))
    ]


def _balanced_weights(labels: list[int], mode: str) -> tuple[float, float]:
    if mode == "none":
        return 1.0, 1.0
    n, pos = len(labels), sum(labels)
    return n / (2 * max(n - pos, 1)), n / (2 * max(pos, 1))


def _trainer(cfg: TrainConfig, phase: str, epochs: int, history_callback):
    """A Lightning trainer for one phase, and its best-by-validation-AUC checkpoint callback."""
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    out = Path(cfg.out)
    best = ModelCheckpoint(
        dirpath=out / "checkpoints",
        filename=f"{phase}-best",
        monitor="val_auc",
        mode="max",
        save_top_k=1,
        save_weights_only=True,
        enable_version_counter=False,
    )
    every_epoch = ModelCheckpoint(
        dirpath=out / "checkpoints", filename=f"{phase}-last", save_top_k=1, enable_version_counter=False
    )  # full state, for --resume
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="auto",
        devices=cfg.devices,
        strategy="ddp" if cfg.devices > 1 else "auto",
        plugins=[_atomic_checkpoint_io()],
        logger=CSVLogger(out, name="logs", version=phase),
        callbacks=[best, every_epoch, EarlyStopping("val_auc", mode="max", patience=cfg.patience), history_callback],
        enable_progress_bar=cfg.progress,
        num_sanity_val_steps=0,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    return trainer, best


def train(cfg: TrainConfig) -> Bundle | None:
    """Train, keep the best weights, pick threshold and temperature on validation, write the run folder.

    Returns the bundle on the main process (``None`` on other DDP ranks)."""
    cfg.check()
    import lightning.pytorch  # noqa: F401 - its import sets its logger to INFO; quieten it afterwards

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no banners about GPUs and loggers
    out = Path(cfg.out)
    if not cfg.resume:
        write_json(out / "config.json", cfg.recorded())
    seed_everything(cfg.seed)
    train_samples, val_samples = training_splits(cfg.data, cfg.val_source, cfg.val_fraction, cfg.seed)
    train_samples = stratified_subset(train_samples, cfg.limit, cfg.seed)
    val_samples = stratified_subset(val_samples, None if cfg.limit is None else max(8, cfg.limit // 4), cfg.seed)
    rank_zero = int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0
    in_memory = cfg.cache == "memory" or (cfg.cache == "auto" and fits_in_memory(len(train_samples), cfg.image_size))
    x_train, train_samples, train_errors = load_images(
        train_samples, cfg.image_size, cfg.progress and rank_zero, "loading train", keep=in_memory
    )
    x_val, val_samples, val_errors = load_images(val_samples, cfg.image_size, cfg.progress and rank_zero, "loading val")
    if rank_zero:
        for line in train_errors + val_errors:
            print(f"skipped {line}")
    y_train = [s.label for s in train_samples]
    if len(set(y_train)) < 2 or len({s.label for s in val_samples}) < 2:
        raise ConfigError(f"{cfg.data}: training and validation sets need images of both classes")

    net = create_model(cfg.backbone, weights=cfg.weights, dropout=cfg.dropout)
    module = _lit_class()(net, _balanced_weights(y_train, cfg.class_weights), cfg.label_smoothing, cfg.image_size)
    if not in_memory:  # streamed from disk: loader processes decode while the model trains
        x_train = [s.path for s in train_samples]
    train_set = ImageDataset(x_train, y_train, cfg.augmentation, cfg.image_size)
    val_set = ImageDataset(x_val, [s.label for s in val_samples])
    workers = cfg.workers or (0 if in_memory else os.cpu_count() or 1)
    generator = torch.Generator().manual_seed(cfg.seed)
    train_loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=generator,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=cfg.batch_size)  # validation is always in memory

    phases = [("head", cfg.epochs, 0, cfg.lr, "constant")]
    if cfg.fine_tune_epochs:
        phases.append(("fine_tune", cfg.fine_tune_epochs, cfg.unfreeze, cfg.fine_tune_lr, cfg.schedule))
    checkpoints = out / "checkpoints"
    state = json.loads((out / "state.json").read_text()) if cfg.resume and (out / "state.json").is_file() else {}
    history = _read_history(out / "history.csv") if cfg.resume else []
    best_score, best_state, timings = -1.0, None, dict(state.get("seconds", {}))
    started = time.perf_counter()
    for phase, epochs, unfreeze, lr, schedule in phases:
        module.configure_phase(unfreeze, lr, schedule)
        if phase in state.get("done", {}):  # finished before an interruption: take its result
            score, best_path = state["done"][phase]
        else:
            last = checkpoints / f"{phase}-last.ckpt"
            resume_from = str(last) if cfg.resume and last.is_file() else None
            if resume_from:  # epochs logged after the last checkpoint are run again
                epochs_done = torch.load(last, map_location="cpu", weights_only=False)["epoch"] + 1
                kept = [r for r in history if r["phase"] == phase][:epochs_done]
                history[:] = [r for r in history if r["phase"] != phase] + kept
            else:
                history[:] = [r for r in history if r["phase"] != phase]
            trainer, best = _trainer(
                cfg, phase, epochs, _history_callback(phase, len(train_set), history, out / "history.csv")
            )
            phase_start = time.perf_counter()
            trainer.fit(module, train_loader, val_loader, ckpt_path=resume_from)
            timings[phase] = round(timings.get(phase, 0) + time.perf_counter() - phase_start, 1)
            score = float(best.best_model_score) if best.best_model_score is not None else -1.0
            best_path = best.best_model_path
            if rank_zero:
                state.setdefault("done", {})[phase] = [score, best_path]
                state["seconds"] = timings
                write_json(out / "state.json", state)
        if score > best_score:
            best_score = score
            best_state = torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(best_state)  # each phase starts from, and the run ends with, the best so far
    if not rank_zero:
        return None
    wall = time.perf_counter() - started
    return _finish_run(
        cfg,
        out,
        net,
        val_set,
        val_samples,
        train_samples,
        history,
        timings,
        wall,
        best_score,
        train_errors + val_errors,
    )


def _finish_run(
    cfg, out, net, val_set, val_samples, train_samples, history, timings, wall, best_score, skipped: list[str]
) -> Bundle:
    from . import metrics as M
    from .reporting import model_card, plot_training_curves

    y_val = np.array([s.label for s in val_samples])
    logits = predict_logits(net, val_set.images.numpy())
    temperature, threshold, rule = M.fit_operating_point(y_val, logits, cfg.target_sensitivity)
    p_raw, p_cal = M.sigmoid(logits), M.sigmoid(logits, temperature)
    groups = [s.patient for s in val_samples]
    validation = M.full_report(y_val, p_cal, groups, threshold, split="validation")
    validation["ece_uncalibrated"] = M.expected_calibration_error(y_val, p_raw)
    validation["at_0.5"] = M.binary_metrics(y_val, p_cal, 0.5)

    write_history(out / "history.csv", history)
    plot_training_curves(history, out / "curves.png")
    speeds = {phase: [r["train_images_per_s"] for r in history if r["phase"] == phase] for phase in timings}
    training = {
        "data": str(cfg.data),
        "train": summarize(train_samples),
        "validation": summarize(val_samples),
        "recipe": cfg.recorded(),
        "best_val_auc": best_score,
        "skipped_unreadable": skipped,
        "wall_seconds": round(wall, 1),
        "phase_seconds": timings,
        "train_images_per_s_median": {k: float(np.median(v)) for k, v in speeds.items() if v},
        "epochs_run": len(history),
    }
    bundle_config = {
        "name": f"pneumoscan-{cfg.backbone}-{cfg.image_size}",
        "version": time.strftime("%Y.%m.%d"),
        "backbone": cfg.backbone,
        "image_size": cfg.image_size,
        "dropout": cfg.dropout,
        "normalization": {
            "input": "8-bit grey, replicated to 3 channels inside the model",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
        },
        "threshold": threshold,
        "threshold_rule": rule,
        "temperature": temperature,
        "training": training,
    }
    bundle_metrics = {"validation": validation}
    bundle = save_bundle(out / "model", net, bundle_config, bundle_metrics)
    if (out / "curves.png").is_file():
        shutil.copyfile(out / "curves.png", out / "model" / "training_curves.png")
    (out / "model" / "MODEL_CARD.md").write_text(model_card(bundle))
    print(
        json.dumps(
            {
                "run": str(out),
                "skipped_unreadable": len(skipped),
                "best_val_auc": round(best_score, 4),
                "threshold": round(threshold, 4),
                "temperature": round(temperature, 3),
                "wall_seconds": round(wall, 1),
                "train_images_per_s": training["train_images_per_s_median"],
            }
        )
    )
    return bundle
