"""Explore fine-tuning recipes on validation, and tabulate them. Never reads the test split.

    python experiments/recipe_exploration.py branch runs/r2 runs/r4-unfreeze3 --set unfreeze=3
    pneumoscan train --resume runs/r4-unfreeze3
    python experiments/recipe_exploration.py table runs/r2 runs/r4-unfreeze3 ...

``branch`` starts a variant of a finished run that shares its frozen (head) phase: the head's best
checkpoint is copied and marked done, the configuration changed as ``--set`` says, and ``pneumoscan
train --resume`` then runs only the fine-tuning phase. One variant costs a fine-tuning phase, not a
whole run, and every variant starts from the same weights. Exploration only: a recipe chosen this
way is retrained from scratch with one command before it ships.

``table`` prints, per run, from its bundle: validation AUC (the best epoch's, as kept), validation log
loss after the run's own temperature, the same two with horizontal-flip test-time augmentation,
fine-tuning seconds per epoch (median), and the minutes of training as if run from scratch (the shared
head phase counted).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

import numpy as np

from pneumoscan.core import metrics as M
from pneumoscan.io.dataset import load_images, training_splits
from pneumoscan.model.networks import predict_logits
from pneumoscan.model.store import load_bundle


def branch(source: Path, target: Path, changes: dict) -> None:
    config = json.loads((source / "config.json").read_text())
    unknown = set(changes) - set(config)
    if unknown:
        raise SystemExit(f"unknown setting(s): {', '.join(sorted(unknown))}")
    state = json.loads((source / "state.json").read_text())
    head_score, head_checkpoint = state["done"]["head"]
    (target / "checkpoints").mkdir(parents=True, exist_ok=True)
    checkpoint = (target / "checkpoints" / "head-best.ckpt").resolve()
    shutil.copyfile(head_checkpoint, checkpoint)
    config.update(changes, out=str(target))
    (target / "config.json").write_text(json.dumps(config, indent=2))
    new_state = {"done": {"head": [head_score, str(checkpoint)]}, "seconds": {"head": state["seconds"]["head"]}}
    (target / "state.json").write_text(json.dumps(new_state, indent=2))
    history = (source / "history.csv").read_text().splitlines()
    (target / "history.csv").write_text("\n".join(line for line in history if ",fine_tune," not in line) + "\n")
    print(f"now run: pneumoscan train --resume {target}")


def parse_setting(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def validation_row(run: Path) -> str:
    bundle = load_bundle(run / "model")
    config = json.loads((run / "config.json").read_text())
    _, val = training_splits(config["data"], config["val_source"], config["val_fraction"], config["seed"])
    x, kept, _ = load_images(val, bundle.image_size, progress=False)
    y = np.array([s.label for s in kept])
    net = bundle.load_net()
    plain = predict_logits(net, x)
    flipped = (plain + predict_logits(net, x[..., ::-1].copy())) / 2
    cells = []
    for z in (plain, flipped):
        t = M.fit_temperature(y, z)
        p = M.sigmoid(z, t)
        cells += [f"{M.roc_auc(y, p):.5f}", f"{M.log_loss(y, p):.4f}"]
    training = bundle.config["training"]
    history = [r.split(",") for r in (run / "history.csv").read_text().splitlines()[1:]]
    fine_tune_epochs = [float(r[2]) for r in history if r[1] == "fine_tune"]
    per_epoch = f"{statistics.median(fine_tune_epochs):.0f}" if fine_tune_epochs else "–"
    wall = sum(training["phase_seconds"].values()) / 60
    return f"| {run.name} | " + " | ".join(cells) + f" | {per_epoch} | {wall:.1f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("branch", help="start a fine-tuning variant of a finished run")
    b.add_argument("source", type=Path, help="finished run folder whose head phase is shared")
    b.add_argument("target", type=Path, help="new run folder")
    b.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="a config change, e.g. unfreeze=3")
    t = sub.add_parser("table", help="validation metrics of finished runs, as a Markdown table")
    t.add_argument("runs", type=Path, nargs="+", help="run folders")
    args = parser.parse_args()
    if args.command == "branch":
        branch(args.source, args.target, dict(parse_setting(s) for s in args.set))
        return
    print(
        "| run | val AUC | val loss (own T) | val AUC, flip TTA | val loss, flip TTA | "
        "fine-tuning s/epoch | training min (head + fine-tuning) |"
    )
    print("|---|---|---|---|---|---|---|")
    for run in args.runs:
        print(validation_row(run))


if __name__ == "__main__":
    main()
