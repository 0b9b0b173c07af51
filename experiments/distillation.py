"""Distillation on frozen features, scored by the ranking rule's designs T and P (no test images).

    PNEUMOSCAN_CACHE=... PYTHONPATH=src python experiments/distillation.py [--teacher-model PATH] \
        [--dinov2 STORE_PREFIX] [--weights 0.25 0.5 0.75 1] [--seeds 0 1 2] \
        [--core-per-class N] [--teachers NAME ...] [--logistic]

A frozen EfficientNet-Lite0 student (the MLP head of ``train --frozen-features``) is fitted on core train
(train minus the random-patient hold-out P and the temporal hold-out T), once on the labels alone and once
per teacher and weight A on ``(1 - A) * class-weighted BCE(label) + A * BCE(teacher)``, and scored on T and
P as experiments/candidates.py scores candidates (AUC; log loss at a temperature fitted on P). Teachers:

- ``bundle``: a bundle's calibrated probabilities through the public Classifier (:class:`distill.Teacher`;
  the shipped model by default, which was fitted on train minus P: it saw core train and most of T);
- ``dinov2``: the DINOv2 ViT-S/14 logistic head of the candidates, fitted on core train, temperature on P;
- ``dinov2+bundle``: the mean of the two calibrated logits (the ensemble the rule made top candidate);
- ``dinov2, other images`` (with ``--core-per-class``): the same head fitted on the core-train images the
  student does not use, so its probabilities on the student's images are out of sample.

The other teachers' probabilities on the student's images are in-sample: they were fitted on those images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from candidates import design_sets, scores  # noqa: E402

from pneumoscan.core import metrics as M  # noqa: E402
from pneumoscan.io.dataset import shared_data_root  # noqa: E402
from pneumoscan.training.distill import Teacher  # noqa: E402
from pneumoscan.training.features import frozen_features  # noqa: E402
from pneumoscan.training.frozen import fit_logistic, fit_mlp, head_logits  # noqa: E402

DEFAULT_MODEL = Path(__file__).parents[1] / "src" / "pneumoscan" / "default_model"


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=shared_data_root() / "chest_xray_224")
    parser.add_argument("--teacher-model", type=Path, default=DEFAULT_MODEL, help="the bundle teacher")
    parser.add_argument(
        "--dinov2",
        metavar="PREFIX",
        help="also the DINOv2 teachers, on features already in the cache stores named PREFIX* (not computed here)",
    )
    parser.add_argument("--weights", type=float, nargs="+", default=[0.5], help="teacher weights A")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="student seeds (mean, sd)")
    parser.add_argument("--teachers", nargs="+", help="only these teachers (names as printed)")
    parser.add_argument("--logistic", action="store_true", help="also a logistic-regression student")
    parser.add_argument("--core-per-class", type=int, help="fit on at most N core-train images per class (quick)")
    args = parser.parse_args()

    train, spare, p_paths, t_paths = design_sets(args.data, args.core_per_class)
    x, kept, errors = frozen_features("efficientnet_lite0", train, 224, progress=True)
    assert not errors
    paths = np.array([str(s.path) for s in kept])
    y = np.array([s.label for s in kept])
    in_p, in_t = np.isin(paths, list(p_paths)), np.isin(paths, list(t_paths))
    core = ~in_p & ~in_t
    print(f"core train {core.sum()} images, T {in_t.sum()}, P {in_p.sum()}", flush=True)

    teachers = {}
    bundle_p, scored, _ = Teacher.load(args.teacher_model).probabilities(kept, progress=True)
    assert len(scored) == len(kept)
    teachers["bundle"] = bundle_p
    if args.dinov2:
        xd = stored_features(args.dinov2, kept)
        dino_logits = head_logits(fit_logistic(xd[core], y[core], np.array([s.patient for s in kept])[core])[0], xd)
        temperature = M.fit_temperature(y[in_p], dino_logits[in_p])
        teachers["dinov2"] = M.sigmoid(dino_logits, temperature)
        teachers["dinov2+bundle"] = M.sigmoid((dino_logits / temperature + logit(bundle_p)) / 2)
        if spare:  # a teacher that never saw the student's images: fitted on the rest of core train
            x_spare = stored_features(args.dinov2, spare)
            fitted = fit_logistic(x_spare, np.array([s.label for s in spare]), [s.patient for s in spare])[0]
            held_logits = head_logits(fitted, xd)
            teachers["dinov2, other images"] = M.sigmoid(held_logits, M.fit_temperature(y[in_p], held_logits[in_p]))
    teachers = {k: v for k, v in teachers.items() if not args.teachers or k in args.teachers}

    print("\n| teacher | on core train: AUC | loss | mean p NORMAL | mean p PNEUMONIA | AUC T | AUC P | loss P |")
    print("|---|---|---|---|---|---|---|---|")
    for name, p in teachers.items():
        print(
            f"| {name} | {M.roc_auc(y[core], p[core]):.4f} | {M.log_loss(y[core], p[core]):.4f} "
            f"| {p[core][y[core] == 0].mean():.3f} | {p[core][y[core] == 1].mean():.3f} "
            f"| {M.roc_auc(y[in_t], p[in_t]):.4f} | {M.roc_auc(y[in_p], p[in_p]):.4f} "
            f"| {M.log_loss(y[in_p], p[in_p]):.4f} |"
        )

    print(f"\nstudent: efficientnet_lite0 frozen + MLP (128); mean (sd) over seeds {args.seeds}")
    print("| teacher | A | AUC T | AUC P | loss T | loss P | accuracy T | sensitivity T | specificity T |")
    print("|---|---|---|---|---|---|---|---|---|")
    runs = [("none", None, 0.0)] + [(n, p, a) for n, p in teachers.items() for a in args.weights]
    for name, p, a in runs:
        rows = []
        for seed in args.seeds:
            state = fit_mlp(x[core], y[core], 128, 0.2, seed, None if p is None else p[core], a)
            logits = head_logits(state, x)
            rows.append(scores(y[in_t], logits[in_t], y[in_p], logits[in_p]))
        print(row([name, "" if p is None else f"{a:g}"], rows), flush=True)
    if args.logistic:
        logistic_students(x, y, kept, core, in_t, in_p, teachers, args.weights)


def stored_features(prefix: str, samples: list) -> np.ndarray:
    """Features of every sample from the feature cache's stores named ``prefix*`` (all must be there)."""
    from pneumoscan.training.features import RowCache, cache_root

    def absent(missing: list) -> None:
        raise SystemExit(f"{len(missing)} images have no stored features under {prefix}")

    return RowCache(cache_root(), prefix, 0).rows(samples, absent)[0]


def row(first: list[str], rows: list[dict]) -> str:
    """A markdown row: the ``first`` cells, then each score's mean (and sd over seeds)."""
    keys = ("auc_t", "auc_p", "loss_t", "loss_p", "acc_t", "sens_t", "spec_t")
    cells = []
    for k in keys:
        values = np.array([r[k] for r in rows])
        digits = 4 if k.startswith(("auc", "loss")) else 3
        sd = f" ({values.std(ddof=1):.{digits}f})" if len(values) > 1 else ""
        cells.append(f"{values.mean():.{digits}f}{sd}")
    return "| " + " | ".join(first + cells) + " |"


def logistic_students(x, y, kept, core, in_t, in_p, teachers, weights) -> None:
    print("\nstudent: efficientnet_lite0 frozen + logistic regression (C by 5-fold patient CV on core train)")
    print("| teacher | A | C | AUC T | AUC P | loss T | loss P | accuracy T | sensitivity T | specificity T |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    groups = np.array([s.patient for s in kept])[core]
    for name, p, a in [("none", None, 0.0)] + [(n, p, a) for n, p in teachers.items() for a in weights]:
        state, c = fit_logistic(x[core], y[core], groups, 0, None if p is None else p[core], a)
        logits = head_logits(state, x)
        r = scores(y[in_t], logits[in_t], y[in_p], logits[in_p])
        print(row([name, "" if p is None else f"{a:g}", f"{c:g}"], [r]), flush=True)


if __name__ == "__main__":
    main()
