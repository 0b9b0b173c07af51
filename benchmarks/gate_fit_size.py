"""The input gate fitted on few validation films: how many of the other validation films it refuses.

    python benchmarks/gate_fit_size.py [--model BUNDLE] [--rounds 8]

The bundle's training sample and validation X-rays (carved from train by patient; the test split is not
opened), their pooled features from the default engine. For 20, 50 and 200 validation films (whole
patients, with their perturbed copies where the bundle's gate has them) and nine times as many training
films (their perturbed copies: the full fit's, of 96 training films), the gate is fitted as training
fits it, and the share of the validation films of the other
patients that it refuses is printed, per part and in all, averaged over ``--rounds`` draws; beside it the
same with the rule before the tail was modelled. The first
row is the full fit: the clean validation films it refuses (what the shipped gate's table reports).
"""

from __future__ import annotations

import argparse
import math
from statistics import NormalDist

import numpy as np

import pneumoscan.model.heads.gate as G
from pneumoscan import Classifier
from pneumoscan.io.dataset import load_images, shared_data_root
from pneumoscan.io.shift import PERTURBATIONS
from pneumoscan.model.heads.gate import PERTURBED_IMAGES as GATE_PERTURBED_IMAGES
from pneumoscan.model.heads.gate import gate_images, perturbed_sample


def earlier_rule(scores: np.ndarray, keep: float) -> float:
    """The rule before the tail was modelled: the empirical quantile, or where fewer than 1 / (1 - keep)
    scores lie beyond it, a log-normal fit's quantile (never below the largest score)."""
    if len(scores) * (1 - keep) >= 1:
        return float(np.quantile(scores, keep))
    logs = np.log(np.maximum(scores, 1e-12))
    z = float(NormalDist().inv_cdf(keep))
    return max(float(np.exp(logs.mean() + z * logs.std(ddof=1))), float(scores.max()))


RULES = {"earlier rule": earlier_rule, "modelled tail": G.keeping}


def fit(train_feats, cal_feats, train_stats, cal_stats, films: int, rule) -> G.Gate:
    """:meth:`Gate.fit` on precomputed statistics, with the limit rule ``rule``."""
    features = G.FeatureScore.fit(train_feats)
    statistics = G.Mahalanobis.fit(train_stats, films)
    layout = G.Mahalanobis.fit(train_stats[:, G.LAYOUT], films)
    low, high = np.quantile(cal_stats, G.WARN_QUANTILES, axis=0)
    gate = G.Gate(features, math.inf, statistics, math.inf, layout, math.inf, low, high)
    gate.feature_limit = rule(features.score(cal_feats), G.KEEP)
    gate.statistics_limit = rule(statistics.score(cal_stats), G.KEEP)
    gate.orientation_limit = rule(gate._orientation(cal_stats)[0], G.KEEP)
    return gate


def refused(gate: G.Gate, stats: np.ndarray, feats: np.ndarray) -> np.ndarray:
    """(N, 3): features, statistics, orientation over their limits."""
    ratio, _ = gate._orientation(stats)
    return (
        np.stack(
            [
                gate.features.score(feats) / gate.feature_limit,
                gate.statistics.score(stats) / gate.statistics_limit,
                ratio / gate.orientation_limit,
            ],
            axis=1,
        )
        > 1
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="bundle (default: the bundled model)")
    parser.add_argument("--rounds", type=int, default=8, help="draws per size (default 8)")
    args = parser.parse_args()
    clf = Classifier.load(args.model, gate=False)
    bundle, size = clf.bundle, clf.image_size
    seed = bundle.config["training"]["recipe"]["seed"]
    train, val = bundle.training_splits(shared_data_root().resolve() / "chest_xray_224")
    train_images = load_images(train, size, progress=False)[0]
    val_images, val, _ = load_images(val, size, progress=False)
    sample, calibration = gate_images(train_images, val_images, seed)
    train_stats = np.concatenate(
        [G.image_statistics(sample), G.image_statistics(perturbed_sample(train_images, seed + 1))]
    )
    cal_stats = G.image_statistics(calibration)
    train_feats, cal_feats = clf.outputs(sample)[1], clf.outputs(calibration)[1]
    n_val, k = len(val_images), len(PERTURBATIONS)
    patients = np.array([s.patient for s in val])
    m = min(GATE_PERTURBED_IMAGES, n_val)
    perturbed = np.sort(np.random.default_rng(seed).choice(n_val, m, replace=False))  # as perturbed_sample
    print(f"Gate of {bundle.name} fitted on few validation films; cells: share of the other validation films")
    print("refused (features, statistics, orientation: all)\n")
    print(f"| validation films | training films | {' | '.join(RULES)} |\n|---|---|{'---|' * len(RULES)}")
    cells = []
    for rule in RULES.values():
        gate = fit(train_feats, cal_feats, train_stats, cal_stats, len(train_feats), rule)
        r = refused(gate, cal_stats[:n_val], cal_feats[:n_val])
        cells.append(f"{r.any(1).mean():.2%} ({r.any(1).sum()} of {n_val})")
    print(f"| all {n_val} (the shipped fit; its own films) | {len(train_feats)} | {' | '.join(cells)} |")
    for n in (20, 50, 200):
        shares = {name: [] for name in RULES}
        for r in range(args.rounds):
            rng = np.random.default_rng([r, n])
            pick = rng.permutation(m)[:n]
            others = np.setdiff1d(np.arange(n_val), perturbed)
            films = np.concatenate([perturbed[pick], rng.permutation(others)[: max(0, n - m)]])
            rest = ~np.isin(patients, patients[films])
            rows = np.concatenate([films, *(n_val + j * m + pick for j in range(k))])
            train_rows = rng.choice(len(train_feats), min(len(train_feats), 9 * n), replace=False)
            stats = np.concatenate([train_stats[train_rows], train_stats[len(train_feats) :]])
            for name, rule in RULES.items():
                gate = fit(train_feats[train_rows], cal_feats[rows], stats, cal_stats[rows], len(train_rows), rule)
                out = refused(gate, cal_stats[:n_val][rest], cal_feats[:n_val][rest])
                shares[name].append([*out.mean(0), out.any(1).mean()])
        cells = [
            ", ".join(f"{v:.1%}" for v in np.mean(s, axis=0)[:3]) + f": {np.mean(s, axis=0)[3]:.1%}"
            for s in shares.values()
        ]
        print(f"| {n} | {min(len(train_feats), 9 * n)} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
