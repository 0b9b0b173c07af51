"""``train --frozen-features``: a head fitted in seconds on cached features of a frozen backbone.

The backbone runs once per image (:mod:`pneumoscan.training.features` caches what it computed); the head, the
operating point, the input gate and the bacterial/viral head are then all fitted on those features.
The result is an ordinary bundle: the same network shape (backbone, dense head, one logit) as a
fine-tuned one, so predict, evaluate, export, serve and calibrate treat it alike.

Heads:
- ``mlp``: the bundle's dense head (128 units, ReLU, dropout), class-balanced loss, full-batch AdamW.
- ``logistic``: class-balanced logistic regression on standardised features, its strength chosen by
  5-fold patient-grouped cross-validation on the training split. It is stored exactly in the dense-head
  shape with 2 hidden units: ``relu(z) - relu(-z) = z``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pneumoscan.core import metrics as M
from pneumoscan.io.dataset import recipe_splits, stratified_subset, summarize
from pneumoscan.io.fileio import write_json
from pneumoscan.model.bundle import Bundle, dense_head_logits, save_bundle
from pneumoscan.model.heads.base import FitData
from pneumoscan.training.distill import Teacher, balanced_class_weights, distillation_loss, soft_rows
from pneumoscan.training.features import frozen_features
from pneumoscan.training.heads import fit_heads_on
from pneumoscan.training.recipe import TrainConfig

C_GRID = (0.01, 0.1, 1.0, 10.0)
MLP_STEPS = 300


def standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(0), x.std(0) + 1e-6


def fit_logistic(
    x: np.ndarray, y: np.ndarray, groups, seed: int = 0, teacher: np.ndarray | None = None, teacher_weight: float = 0.5
) -> tuple[dict, float]:
    """Dense-head weights (2 hidden units) equal to a class-balanced logistic regression, and its C. With
    ``teacher`` probabilities, the regression minimises the distillation loss (:func:`distill.soft_rows`);
    C is still chosen by the AUC against the labels."""
    from sklearn.linear_model import LogisticRegression

    mean, scale = standardise(x)
    z = (x - mean) / scale
    folds = M.patient_folds(y, groups, 5, seed)

    def fit(c: float, rows: np.ndarray):
        soft = None if teacher is None else teacher[rows]
        xs, ys, ws = soft_rows(z[rows], y[rows], balanced_class_weights(y[rows]), soft, teacher_weight)
        return LogisticRegression(C=c, max_iter=3000).fit(xs, ys, sample_weight=ws)

    def cv_auc(c: float) -> float:
        aucs = [M.roc_auc(y[folds == k], fit(c, folds != k).decision_function(z[folds == k])) for k in range(5)]
        return float(np.mean(aucs))

    c = max(C_GRID, key=cv_auc)
    model = fit(c, np.ones(len(y), bool))
    w = model.coef_[0] / scale  # standardisation folded in: w.x + b on raw features
    b = float(model.intercept_[0] - (model.coef_[0] * mean / scale).sum())
    state = {
        "0.weight": np.stack([w, -w]).astype(np.float32),
        "0.bias": np.array([b, -b], np.float32),
        "3.weight": np.array([[1.0, -1.0]], np.float32),
        "3.bias": np.zeros(1, np.float32),
    }
    return state, c


def fit_mlp(
    x: np.ndarray,
    y: np.ndarray,
    hidden: int,
    dropout: float,
    seed: int = 0,
    teacher: np.ndarray | None = None,
    teacher_weight: float = 0.5,
) -> dict:
    """The dense head trained on standardised features (folded back into the first layer); with ``teacher``
    probabilities, on the distillation loss (:func:`distill.distillation_loss`)."""
    import torch

    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small full-batch head: one thread is fastest, and immune to a busy machine
    try:
        return _fit_mlp(x, y, hidden, dropout, teacher, teacher_weight)
    finally:
        torch.set_num_threads(threads)


def _fit_mlp(x: np.ndarray, y: np.ndarray, hidden: int, dropout: float, teacher, teacher_weight: float) -> dict:
    import torch
    from torch import nn

    mean, scale = standardise(x)
    z = torch.from_numpy(((x - mean) / scale).astype(np.float32))
    t = torch.from_numpy(y.astype(np.float32))
    soft = None if teacher is None else torch.as_tensor(np.asarray(teacher), dtype=torch.float32)
    head = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 1))
    class_weights = torch.tensor(balanced_class_weights(y), dtype=torch.float32)
    optimiser = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-2)
    for _ in range(MLP_STEPS):
        optimiser.zero_grad()
        loss = distillation_loss(head(z).squeeze(1), t, class_weights, soft, teacher_weight)
        loss.backward()
        optimiser.step()
    state = {k: v.detach().numpy().copy() for k, v in head.state_dict().items()}
    w = state["0.weight"] / scale.astype(np.float32)
    state["0.bias"] = state["0.bias"] - (w * mean.astype(np.float32)).sum(1)
    state["0.weight"] = w
    return state


def head_logits(state: dict, x: np.ndarray) -> np.ndarray:
    """The dense head's logits on features, from its state dict (numpy; eval mode, so dropout is off)."""
    head = {"w1": state["0.weight"], "b1": state["0.bias"], "w2": state["3.weight"], "b2": state["3.bias"]}
    return dense_head_logits(head, x)


def train_frozen(cfg: TrainConfig, teacher: Teacher | None = None) -> Bundle:
    """Fit the head (and operating point, gate, subtype head) on cached frozen features; write the bundle.
    With a teacher, the head is fitted on the distillation loss (its probabilities cached per image).

    For a backbone the registry marks ``head_only_when_frozen`` (DINOv2), the features come from the int8
    ONNX graph that the bundle ships (:mod:`pneumoscan.model.frozen_graphs`) and the bundle stores only the head."""
    from pneumoscan.model.backbones import get_backbone
    from pneumoscan.training.run import bundle_config, operating_point, run_config

    started = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", run_config(cfg, teacher))
    head_only = get_backbone(cfg.backbone).head_only_when_frozen and cfg.weights == "imagenet"
    graph = _shipped_graph(cfg) if head_only else None
    train_samples, val_samples = recipe_splits(cfg.data, cfg.recorded())
    train_samples = stratified_subset(train_samples, cfg.limit, cfg.seed)
    args = {"image_size": cfg.image_size, "weights": cfg.weights, "progress": cfg.progress, "graph": graph}
    x_train, train_samples, train_errors = frozen_features(cfg.backbone, train_samples, **args)
    x_val, val_samples, val_errors = frozen_features(cfg.backbone, val_samples, **args)
    soft = None
    if teacher is not None:  # its probabilities come in the order of the images it could read
        soft, scored, teacher_errors = teacher.probabilities(train_samples, cfg.progress)
        x_train = x_train[np.isin([str(s.path) for s in train_samples], [str(s.path) for s in scored])]
        train_samples, train_errors = scored, train_errors + teacher_errors
    distil = {"teacher": soft, "teacher_weight": teacher.weight if teacher else 0.5}
    y = np.array([s.label for s in train_samples])
    fitted_at = time.perf_counter()
    if cfg.head == "logistic":
        state, c = fit_logistic(x_train, y, [s.patient for s in train_samples], cfg.seed, **distil)
        hidden, head_settings = 2, {"head": "logistic", "C": c}
    else:
        state = fit_mlp(x_train, y, 128, cfg.dropout, cfg.seed, **distil)
        hidden, head_settings = 128, {"head": "mlp", "steps": MLP_STEPS}
    head_seconds = time.perf_counter() - fitted_at

    net, features_of = _network(cfg, hidden, state, graph)
    logits = head_logits(state, x_val)
    temperature, threshold, rule, validation = operating_point(cfg, val_samples, logits)

    fitting = FitData(
        cfg.seed, cfg.image_size, train_samples, val_samples, features_of, train_features=x_train, val_features=x_val
    )
    extras, reports, _ = fit_heads_on(fitting)  # the feature heads (feature_heads.HEADS) on the cached features
    validation.update(reports)
    training = {
        "data": str(cfg.data),
        "train": summarize(train_samples),
        "validation": summarize(val_samples),
        "recipe": {**cfg.recorded(), **head_settings},
        "best_val_auc": M.roc_auc([s.label for s in val_samples], logits),
        "skipped_unreadable": train_errors + val_errors,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "head_fit_seconds": round(head_seconds, 2),
        **({"teacher": teacher.record()} if teacher else {}),
    }
    config = bundle_config(cfg, hidden, threshold, rule, temperature, training)
    if graph is None:
        return save_bundle(out / "model", net, config, {"validation": validation}, extras=extras, half=_needs_half(net))
    from pneumoscan.model.frozen_graphs import QUANTIZATION, graph_digest

    training["features_graph"] = {"quantization": QUANTIZATION, "sha256": graph_digest(graph)}
    config["weights_scope"] = "head"
    bundle = save_bundle(out / "model", net, config, {"validation": validation}, extras=extras)
    from pneumoscan.model.onnx_export import export_onnx

    export_onnx(bundle)  # the int8 backbone and the head: what predicts without PyTorch
    return bundle


def _shipped_graph(cfg: TrainConfig) -> Path:
    from pneumoscan.model.frozen_graphs import INT8, backbone_graph

    return backbone_graph(cfg.backbone, cfg.image_size, INT8)


def _network(cfg: TrainConfig, hidden: int, state: dict, graph: Path | None):
    """The network whose weights the bundle stores (the whole one, or the head alone where the backbone
    ships as ``graph``), and what computes features of more images (the gate's perturbed ones)."""
    import torch
    from torch import nn

    from pneumoscan.model.networks import create_model, predict_outputs

    if graph is None:
        net = create_model(
            cfg.backbone, weights=cfg.weights, dropout=cfg.dropout, hidden=hidden, image_size=cfg.image_size
        )
        net.head.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        return net, lambda images: predict_outputs(net, images, batch_size=32)[1]
    from pneumoscan.model.frozen_graphs import GraphFeatures

    width = state["0.weight"].shape[1]
    head = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(hidden, 1))
    head.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    features = GraphFeatures(graph)
    return nn.ModuleDict({"head": head}), lambda images: np.concatenate(
        [features(images[i : i + 32]) for i in range(0, len(images), 32)]
    )


MAX_FP32_BYTES = 45 * 2**20  # a weights file above this is stored in float16 (the 50 MB per-file limit)


def _needs_half(net) -> bool:
    return sum(p.numel() for p in net.state_dict().values()) * 4 > MAX_FP32_BYTES
