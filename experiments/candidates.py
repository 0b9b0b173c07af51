"""Candidates on frozen features, scored by the ranking rule of docs/accuracy.md (no test images).

    PYTHONPATH=src python experiments/candidates.py --backbone dinov2_vits14 --backbone efficientnet_lite0 \
        [--ensemble r11=runs/designs/r11-patients.npz]

Fits each head on core train (train minus the random-patient hold-out P and the temporal hold-out T),
scores it on T and P, and prints one markdown table; ``--ensemble`` adds the average of each candidate's
calibrated logits with an already-read model's (cached by validation_designs.py), on P and T & P only.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pneumoscan.core import metrics as M
from pneumoscan.io.dataset import load_split, shared_data_root, split_by_number, split_by_patient, stratified_subset
from pneumoscan.model.frozen_graphs import INT8, backbone_graph
from pneumoscan.training.features import frozen_features
from pneumoscan.training.frozen import fit_logistic, fit_mlp, head_logits


def scores(y_t, logits_t, y_p, logits_p) -> dict:
    temperature = M.fit_temperature(y_p, logits_p)
    at_t = M.binary_metrics(y_t, M.sigmoid(logits_t, temperature), 0.5)
    return {
        "auc_t": at_t["auc"],
        "auc_p": M.roc_auc(y_p, logits_p),
        "loss_t": at_t["loss"],
        "loss_p": M.log_loss(y_p, M.sigmoid(logits_p, temperature)),
        "acc_t": at_t["accuracy"],
        "sens_t": at_t["sensitivity"],
        "spec_t": at_t["specificity"],
        "temperature": temperature,
    }


class DesignSets(NamedTuple):
    used: list  # core train (at most core_per_class per class) and both held-out sets
    spare: list  # core train left out by core_per_class
    p: set[str]  # held-out design P: random patients, 10%
    t: set[str]  # held-out design T: the last 20% of file numbers


def design_sets(data: Path, core_per_class: int | None = None) -> DesignSets:
    """The training split's images under the two held-out designs, P and T; the rest is core train."""
    train = load_split(data, "train")
    _, p_set = split_by_patient(train, 0.1, 0)
    _, t_set = split_by_number(train, 0.2)
    p_paths, t_paths = {str(s.path) for s in p_set}, {str(s.path) for s in t_set}
    core_set = [s for s in train if str(s.path) not in p_paths | t_paths]
    core = {str(s.path) for s in stratified_subset(core_set, core_per_class)}
    used = [s for s in train if str(s.path) in core | p_paths | t_paths]
    return DesignSets(used, [s for s in core_set if str(s.path) not in core], p_paths, t_paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", action="append", default=[])
    parser.add_argument("--data", type=Path, default=shared_data_root() / "chest_xray_224")
    parser.add_argument("--ensemble", action="append", default=[], help="NAME=NPZ of logits on P")
    parser.add_argument("--save", type=Path, help="folder for each candidate's logits on P and T (npz)")
    parser.add_argument("--core-per-class", type=int, help="fit on at most N core-train images per class (quick)")
    parser.add_argument(
        "--int8", action="store_true", help="features of the int8 ONNX graph a head-only bundle ships (frozen_onnx.py)"
    )
    args = parser.parse_args()
    train, _, p_paths, t_paths = design_sets(args.data, args.core_per_class)
    print("| candidate | C | AUC T | AUC P | loss T | loss P | acc T | sens T | spec T |")
    print("|---|---|---|---|---|---|---|---|---|")
    on_p = {}
    for backbone in args.backbone:
        graph = backbone_graph(backbone, 224, INT8) if args.int8 else None
        x, kept, errors = frozen_features(backbone, train, 224, progress=False, graph=graph)
        backbone += " int8" if args.int8 else ""
        assert not errors
        paths = np.array([str(s.path) for s in kept])
        y = np.array([s.label for s in kept])
        groups = np.array([s.patient for s in kept])
        in_p = np.isin(paths, list(p_paths))
        in_t = np.isin(paths, list(t_paths))
        core = ~in_p & ~in_t
        logistic, best_c = fit_logistic(x[core], y[core], groups[core])
        mlp = fit_mlp(x[core], y[core], 128, 0.2)
        for name, state, c in (
            (f"{backbone} + logistic", logistic, best_c),
            (f"{backbone} + MLP", mlp, None),
        ):
            logits = lambda features, state=state: head_logits(state, features)
            r = scores(y[in_t], logits(x[in_t]), y[in_p], logits(x[in_p]))
            on_p[name] = (paths[in_p], logits(x[in_p]) / r["temperature"], y[in_p])
            if args.save:
                args.save.mkdir(parents=True, exist_ok=True)
                np.savez(
                    args.save / f"{name.replace(' + ', '-').replace(' ', '-')}.npz",
                    p_paths=paths[in_p],
                    p_logits=logits(x[in_p]),
                    t_paths=paths[in_t],
                    t_logits=logits(x[in_t]),
                    temperature=r["temperature"],
                )
            print(
                f"| {name} | {c if c is not None else ''} | {r['auc_t']:.4f} | {r['auc_p']:.4f} | {r['loss_t']:.4f} "
                f"| {r['loss_p']:.4f} | {r['acc_t']:.3f} | {r['sens_t']:.3f} | {r['spec_t']:.3f} |",
                flush=True,
            )
    if args.ensemble:
        ensembles(args.ensemble, on_p, t_paths)


def ensembles(specs: list[str], on_p: dict, t_paths: set) -> None:
    """Average of calibrated logits with an already-read model, on P and on T & P (AUC, loss at T=1)."""
    print("\n| ensemble | AUC P | loss P | AUC T&P | loss T&P | member AUC P | member loss P |")
    print("|---|---|---|---|---|---|---|")
    for spec in specs:
        other, path = spec.split("=", 1)
        stored = np.load(path, allow_pickle=False)
        theirs = dict(zip(stored["paths"].tolist(), stored["logits"]))
        for name, (paths, logits, y) in on_p.items():
            mine = np.array([theirs[p] for p in paths])
            mean = (logits + mine) / 2
            tp = np.isin(paths, list(t_paths))
            print(
                f"| {name} with {other} | {M.roc_auc(y, mean):.4f} | {M.log_loss(y, M.sigmoid(mean)):.4f} "
                f"| {M.roc_auc(y[tp], mean[tp]):.4f} | {M.log_loss(y[tp], M.sigmoid(mean[tp])):.4f} "
                f"| {M.roc_auc(y, logits):.4f} / {M.roc_auc(y, mine):.4f} "
                f"| {M.log_loss(y, M.sigmoid(logits)):.4f} / {M.log_loss(y, M.sigmoid(mine)):.4f} |"
            )


if __name__ == "__main__":
    main()
