"""Candidates on frozen features, scored by the ranking rule of docs/accuracy.md (no test images).

    PYTHONPATH=src python experiments/candidates.py --backbone dinov2_vits14 --backbone efficientnet_lite0 \
        [--ensemble r11=runs/designs/r11-patients.npz]

Fits each head on core train (train minus the random-patient hold-out P and the temporal hold-out T),
scores it on T and P, and prints one markdown table; ``--ensemble`` adds the average of each candidate's
calibrated logits with an already-read model's (cached by validation_designs.py), on P and T & P only.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumoscan import metrics as M
from pneumoscan.data import load_split, shared_data_root, split_by_number, split_by_patient
from pneumoscan.features import frozen_features

C_GRID = (0.01, 0.1, 1.0, 10.0)


@dataclass
class Head:
    """A linear head ``x -> (x - mean) / scale @ w + b`` (logistic regression on standardised features)."""

    mean: np.ndarray
    scale: np.ndarray
    w: np.ndarray
    b: float
    c: float

    def logits(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.scale) @ self.w + self.b


def fit_logistic(x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int = 0) -> Head:
    """Class-balanced logistic regression on standardised features; C by 5-fold patient-grouped AUC."""
    from sklearn.linear_model import LogisticRegression

    mean, scale = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / scale
    folds = M.patient_folds(y, groups, 5, seed)
    best = None
    for c in C_GRID:
        scores = []
        for k in range(5):
            train, held = folds != k, folds == k
            model = LogisticRegression(C=c, class_weight="balanced", max_iter=2000).fit(z[train], y[train])
            scores.append(M.roc_auc(y[held], model.decision_function(z[held])))
        if best is None or np.mean(scores) > best[0]:
            best = (float(np.mean(scores)), c)
    model = LogisticRegression(C=best[1], class_weight="balanced", max_iter=2000).fit(z, y)
    return Head(mean, scale, model.coef_[0], float(model.intercept_[0]), best[1])


def fit_mlp(x: np.ndarray, y: np.ndarray, seed: int = 0, hidden: int = 128, steps: int = 300):
    """The bundle's head (dense 128, ReLU, dropout 0.2, dense 1), class-balanced BCE, full batch AdamW."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    mean, scale = x.mean(0), x.std(0) + 1e-6
    z = torch.from_numpy(((x - mean) / scale).astype(np.float32))
    t = torch.from_numpy(y.astype(np.float32))
    head = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, 1))
    pos_weight = torch.tensor((y == 0).sum() / max(1, (y == 1).sum()))
    optimiser = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-2)
    for _ in range(steps):
        optimiser.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(head(z).squeeze(1), t, pos_weight=pos_weight)
        loss.backward()
        optimiser.step()
    head.eval()

    def logits(features: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return head(torch.from_numpy(((features - mean) / scale).astype(np.float32))).squeeze(1).numpy()

    return logits


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", action="append", default=[])
    parser.add_argument("--data", type=Path, default=shared_data_root() / "chest_xray_224")
    parser.add_argument("--ensemble", action="append", default=[], help="NAME=NPZ of logits on P")
    parser.add_argument("--save", type=Path, help="folder for each candidate's logits on P and T (npz)")
    args = parser.parse_args()
    train = load_split(args.data, "train")
    _, p_set = split_by_patient(train, 0.1, 0)
    _, t_set = split_by_number(train, 0.2)
    p_paths, t_paths = {str(s.path) for s in p_set}, {str(s.path) for s in t_set}
    print("| candidate | C | AUC T | AUC P | loss T | loss P | acc T | sens T | spec T |")
    print("|---|---|---|---|---|---|---|---|---|")
    on_p = {}
    for backbone in args.backbone:
        x, kept, errors = frozen_features(backbone, train, 224, progress=False)
        assert not errors
        paths = np.array([str(s.path) for s in kept])
        y = np.array([s.label for s in kept])
        groups = np.array([s.patient for s in kept])
        in_p = np.isin(paths, list(p_paths))
        in_t = np.isin(paths, list(t_paths))
        core = ~in_p & ~in_t
        logistic = fit_logistic(x[core], y[core], groups[core])
        mlp = fit_mlp(x[core], y[core])
        for name, logits, c in (
            (f"{backbone} + logistic", logistic.logits, logistic.c),
            (f"{backbone} + MLP", mlp, None),
        ):
            r = scores(y[in_t], logits(x[in_t]), y[in_p], logits(x[in_p]))
            on_p[name] = (paths[in_p], logits(x[in_p]) / r["temperature"], y[in_p])
            if args.save:
                args.save.mkdir(parents=True, exist_ok=True)
                np.savez(
                    args.save / f"{name.replace(' + ', '-')}.npz",
                    p_paths=paths[in_p], p_logits=logits(x[in_p]), t_paths=paths[in_t], t_logits=logits(x[in_t]),
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
