"""What a training run is: its settings, each declared once with its default, help and allowed values.

Light on purpose (no torch, no Lightning): the CLI builds its ``train`` options from :class:`TrainConfig`
without importing the training machinery, and a run folder's ``config.json`` is read back through it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from pneumoscan.core import settings
from pneumoscan.core.errors import ConfigError
from pneumoscan.core.options import operating_rule_option, target_sensitivity_option
from pneumoscan.core.settings import option
from pneumoscan.io.fileio import read_json_object
from pneumoscan.model.backbones import BACKBONES, HEAD, check_image_size
from pneumoscan.training.augment import Augmentation
from pneumoscan.training.distill import DEFAULT_WEIGHT

SCHEDULES = ("constant", "onecycle")
CLASS_WEIGHTS = ("balanced", "none")
VAL_SOURCES = ("patients", "temporal", "official")
HEADS = ("mlp", "logistic")
CACHE_MODES = ("auto", "memory", "disk")
ACCELERATORS = ("auto", "cpu", "gpu")
PRECISIONS = ("32", "16-mixed", "bf16-mixed")

# Augmentation entries added after recipes were first recorded, with the value that means off: recorded only
# when on, so the recipes recorded before them (which lack them) are still the recipes they name.
OFF_UNLESS_RECORDED = {"aspect": 0.0}

# Named presets: the settings each changes from TrainConfig's defaults (augmentation settings under
# "augmentation"). Flags given beside --recipe override the preset's values. The defaults themselves are
# the "default" recipe: 3 epochs on a frozen backbone, then 4 fine-tuning the last 6 blocks.
RECIPES: dict[str, dict] = {
    "default": {},
    # the shipped model's recipe: every block fine-tuned, with acquisition augmentation
    "shipped": {"unfreeze": 16, "augmentation": {"acquisition": 0.5}},
    # a smoke test of a setup (a minute or two on a laptop): not a useful model
    "quick": {"epochs": 1, "fine_tune_epochs": 1, "limit": 200},
}
RECIPE_HELP = {
    "default": "3 frozen epochs, then 4 fine-tuning the last 6 blocks (Adam 3e-4, one-cycle)",
    "shipped": "the shipped model's: as default, fine-tuning all 16 blocks, acquisition augmentation 0.5",
    "quick": "1 frozen and 1 fine-tuning epoch on at most 200 images per class, to try a setup",
}


@dataclass
class TrainConfig:
    """A training run's settings; each option's default, help and allowed values live here alone."""

    recipe: str = option(
        "default",
        "named preset of the settings below (flags given with it override it): "
        + "; ".join(f"'{k}': {v}" for k, v in RECIPE_HELP.items()),
        choices=tuple(RECIPES),
    )
    data: str | None = option(None, "dataset root with train/{NORMAL,PNEUMONIA} (Kaggle layout)", path=True)
    out: str | None = option(None, "run folder to write (config, history, curves, checkpoints, model/)", path=True)
    backbone: str = option(
        "efficientnet_lite0", f"pretrained backbone (pneumoscan.model.backbones): {', '.join(BACKBONES)}"
    )
    weights: str = option(
        "imagenet",
        "'imagenet': the backbone's pretrained weights from its package, sha256 checked (the train extra for "
        "efficientnet_lite0, the backbones extra for efficientnet_lite2 and dinov2_vits14, downloaded for "
        "mobilenet_v2 where online), or a torchvision/timm checkpoint FILE",
    )
    image_size: int = option(224, "square input size in pixels", at_least=32, at_most=1024)
    epochs: int = option(3, "frozen-backbone epochs, phase 1", at_least=1, at_most=10_000)
    batch_size: int = option(32, "images per batch and device", at_least=1, at_most=4096)
    lr: float = option(1e-3, "Adam learning rate of phase 1", above=0, at_most=10)
    patience: int = option(5, "epochs without a better validation AUC before stopping", at_least=1)
    fine_tune_epochs: int = option(
        4, "phase 2 epochs with the last blocks unfrozen (0: none)", at_least=0, at_most=10_000
    )
    unfreeze: int = option(6, "blocks unfrozen in phase 2, counted from the top", at_least=0)
    fine_tune_lr: float = option(3e-4, "Adam learning rate of phase 2", above=0, at_most=10)
    schedule: str = option("onecycle", "phase 2 learning-rate schedule", choices=SCHEDULES)
    class_weights: str = option("balanced", "weight the loss so both classes count equally", choices=CLASS_WEIGHTS)
    label_smoothing: float = option(0.0, "pull training targets towards 0.5 by this much", at_least=0, below=1)
    dropout: float = option(HEAD["dropout"], "dropout before the last dense layer", at_least=0, below=1)
    val_source: str = option(
        "patients",
        "'patients': carve validation from train by random patients; 'temporal': the patients with the "
        "highest file numbers of each series; 'official': the 16-image val split",
        choices=VAL_SOURCES,
    )
    val_fraction: float = option(0.1, "share of patients per class held out for validation", above=0, below=1)
    operating_rule: str = operating_rule_option()  # declared once for train, calibrate and evaluate
    target_sensitivity: float | None = target_sensitivity_option()
    seed: int = option(0, "seed for the split, initialisation, order and augmentation", at_least=0, below=2**32)
    split_seed: int | None = option(
        None,
        "seed for the validation split alone (default: --seed): the members of a deep ensemble share one split "
        "and differ in --seed",
        at_least=0,
        below=2**32,
    )
    devices: int = option(
        1, "processes/devices per node; 2+ runs DDP (gloo on CPU, NCCL on GPUs)", at_least=1, at_most=1024
    )
    num_nodes: int = option(
        1, "machines taking part (DDP across nodes; launch one process per device with torchrun or SLURM)", at_least=1
    )
    accelerator: str = option("auto", "Lightning accelerator: auto, cpu or gpu", choices=ACCELERATORS)
    precision: str = option("32", "training precision: 32, 16-mixed (GPUs) or bf16-mixed", choices=PRECISIONS)
    workers: int = option(0, "data-loader worker processes (0: images are in memory)", at_least=0, at_most=256)
    cache: str = option(
        "auto",
        "keep decoded training images in memory, or stream them from disk with loader workers "
        "(auto: memory when they take at most a quarter of RAM)",
        choices=CACHE_MODES,
    )
    limit: int | None = option(None, "use at most N training images per class (quick runs)", at_least=1)
    frozen_features: bool = option(
        False,
        "keep the backbone frozen: compute its features once (cached under $PNEUMOSCAN_CACHE/features) and fit "
        "the head on them in seconds; --epochs, --fine-tune-epochs and augmentation do not apply",
    )
    head: str = option(
        "mlp",
        "head fitted on frozen features: 'mlp' (dense 128, ReLU, dropout) or 'logistic' (logistic regression, "
        "its strength chosen by 5-fold patient cross-validation on the training split)",
        choices=HEADS,
    )
    teacher: str | None = option(
        None,
        "distil from this model bundle (any bundle, an ensemble too): the loss adds the teacher's calibrated "
        "probability of each training image as a second target (computed once per image on the un-augmented "
        "file, at the teacher's own image size, with its gate off; cached under $PNEUMOSCAN_CACHE/teacher)",
        path=True,
    )
    teacher_weight: float | None = option(
        None,
        f"share A of the teacher's term: loss = (1-A) * class-weighted BCE(label) + A * BCE(teacher "
        f"probability); --label-smoothing smooths both targets (default {DEFAULT_WEIGHT} with --teacher)",
        at_least=0,
        at_most=1,
    )
    augmentation: Augmentation = field(default_factory=Augmentation)
    progress: bool = True
    resume: bool = False

    @classmethod
    def from_recipe(cls, name: str = "default", **settings_given) -> TrainConfig:
        """The preset ``name`` with ``settings_given`` on top (``augmentation`` as a dict of the augmentation
        settings given, or an :class:`Augmentation`); the recipe's name is recorded with the run."""
        if name not in RECIPES:
            raise ConfigError(f"--recipe must be one of {', '.join(RECIPES)}, got {name!r}")
        preset = dict(RECIPES[name])
        augmentation = settings_given.pop("augmentation", {})
        if isinstance(augmentation, Augmentation):
            augmentation = asdict(augmentation)
        augmentation = Augmentation(**{**preset.pop("augmentation", {}), **augmentation})
        return cls(**{**preset, **settings_given, "recipe": name, "augmentation": augmentation})

    @classmethod
    def from_run(cls, run_dir: str | Path, progress: bool = True) -> TrainConfig:
        """The configuration a run folder was started with, set to resume it (validated like any other)."""
        path = Path(run_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{run_dir}: not a run folder to resume (no config.json)")
        saved = read_json_object(path, "run configuration")
        augmentation = saved.get("augmentation", {})
        if not isinstance(augmentation, dict) or set(augmentation) - {f.name for f in fields(Augmentation)}:
            raise ConfigError(f"{path}: 'augmentation' must be an object of known augmentation settings")
        known = {f.name for f in fields(cls)} - {"out", "progress", "resume", "augmentation"}
        try:
            cfg = cls(
                **{k: v for k, v in saved.items() if k in known},
                augmentation=Augmentation(**augmentation),
                out=str(run_dir),
                progress=progress,
                resume=True,
            )
            cfg.check()
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        return cfg

    def recorded(self) -> dict:
        """The settings that define the run, as written to config.json (not how it is watched or resumed)."""
        recorded = {k: v for k, v in asdict(self).items() if k not in ("progress", "resume")}
        augmentation = recorded["augmentation"]
        for name, off in OFF_UNLESS_RECORDED.items():  # added later: a recipe recorded before reads as off
            if augmentation.get(name) == off:
                del augmentation[name]
        if recorded["split_seed"] is None:  # added later too: absent means the split follows --seed
            del recorded["split_seed"]
        return recorded

    def check(self) -> None:
        if not self.data:
            raise ConfigError("train needs --data ROOT")
        if not self.out:
            raise ConfigError("train needs --out RUN_DIR")
        if self.backbone not in BACKBONES:
            raise ConfigError(f"unknown backbone {self.backbone!r}; expected one of {', '.join(BACKBONES)}")
        settings.check(self)
        settings.check(self.augmentation)
        if self.head != "mlp" and not self.frozen_features:
            raise ConfigError("--head logistic needs --frozen-features")
        check_image_size(self.backbone, self.image_size)
        if self.teacher_weight is not None and not self.teacher:
            raise ConfigError("--teacher-weight needs --teacher BUNDLE")
