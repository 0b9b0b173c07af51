"""Stability fine-tune: make the shipped EfficientNet-Lite0 invariant to what canonicalisation leaves behind.

A full-resolution film and its 224 px Kermany copy reach the model as slightly different 224 x 224 images
(JPEG draft decoding, another resampling, another JPEG q75 round trip). This script fine-tunes the shipped
default briefly by self-distillation: the teacher is the shipped network itself (frozen; its logits on the
clean copy, computed once with its ONNX model, also for the mirrored copy), the student sees a perturbed copy:

- "full-res path" (p_fullres): the copy upsampled bicubic by a random factor (1.5-6x, random aspect 0.9-1.7, a
  sub-pixel crop offset), with slight detail noise, stored as a JPEG at a random quality (85-97) and then made the
  model's input by the real pipeline (``images.prepare``: JPEG draft decoding, bilinear to 224, JPEG q75);
- a JPEG re-encode of the copy at quality 60-95 (p_jpeg), a sub-pixel shift (p_shift), or nothing (the rest);
- a horizontal mirror with probability 0.5 (the teacher's logit is that of the mirrored clean copy).

loss = bce * class-balanced BCE(student(aug x), y) + lam * mean((student(aug x) - teacher(x))^2)   [logits]

Batch-norm statistics stay frozen (the whole network runs in eval mode; dropout off); the stem and the first
``16 - unfreeze`` blocks are frozen. Adam, warm-up then cosine decay over the number of steps that fits the time
budget (estimated after the first steps). Only the bundle's own training patients are trained on; validation
patients (``training_splits(...)[1]``) are only measured; the test split is never read.

    PYTHONPATH=src python experiments/stability_finetune.py train --out /work/stab-out --minutes 28
    PYTHONPATH=src python experiments/stability_finetune.py bundle --out /work/stab-out   # writes OUT/model

``train`` writes OUT/student.safetensors, OUT/train_log.jsonl and OUT/eval.json (validation metrics and a
validation-patient proxy of the skew, before and after). ``bundle`` writes a bundle (refitted temperature, new
validation metrics) to OUT/model; then run ``pneumoscan heads fit``, ``pneumoscan export --int8`` and
``pneumoscan verify`` on it, and ``experiments/stability_measure.py`` for the 64 full-resolution pairs.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pneumoscan.core import metrics as M
from pneumoscan.inference.classifier import Classifier
from pneumoscan.io.dataset import load_images
from pneumoscan.io.images import Preprocessing, prepare
from pneumoscan.model.bundle import save_bundle
from pneumoscan.model.store import load_bundle

DATA = "/work/shared/data/chest_xray_224"
CANON = Preprocessing(224)


# ----------------------------------------------------------------------------------------------- perturbations
def fullres_path(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 224 copy made into a plausible full-resolution JPEG film, then through the real pipeline."""
    f = math.exp(rng.uniform(math.log(1.5), math.log(6.0)))
    aspect = rng.uniform(0.9, 1.7)
    h, w = round(224 * f), round(224 * f * aspect)
    big = Image.fromarray(x).resize((w, h), Image.Resampling.BICUBIC)
    # sub-pixel offset: crop up to one source pixel (f film pixels) at each edge
    left, top, right, bottom = (int(rng.integers(0, max(1, round(f)))) for _ in range(4))
    big = big.crop((left, top, w - right, h - bottom))
    a = np.asarray(big, dtype=np.float32)
    sigma = rng.uniform(0.0, 4.0)
    if sigma > 0.3:
        a = a + rng.normal(0.0, sigma, a.shape).astype(np.float32)
    big = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8))
    if rng.random() < 0.8:  # the films are JPEGs: the real pipeline then decodes them with draft
        buf = io.BytesIO()
        big.save(buf, "JPEG", quality=int(rng.integers(85, 98)))
        return prepare(buf.getvalue(), CANON)
    return CANON.apply(big)


def jpeg(x: np.ndarray, q: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, "JPEG", quality=q)
    return np.array(Image.open(buf).convert("L"))


def subpixel_shift(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    dx, dy = rng.uniform(-0.5, 0.5, 2)
    im = Image.fromarray(x).transform(
        x.shape[::-1], Image.Transform.AFFINE, (1, 0, dx, 0, 1, dy), Image.Resampling.BILINEAR
    )
    return np.array(im)


def perturb(x: np.ndarray, rng: np.random.Generator, p_fullres=0.7, p_jpeg=0.1, p_shift=0.1) -> np.ndarray:
    u = rng.random()
    if u < p_fullres:
        return fullres_path(x, rng)
    if u < p_fullres + p_jpeg:
        return jpeg(x, int(rng.integers(60, 96)))
    if u < p_fullres + p_jpeg + p_shift:
        return subpixel_shift(x, rng)
    return x


class Perturbed(torch.utils.data.Dataset):
    def __init__(self, images, labels, teacher, teacher_flip, args):
        self.images, self.labels, self.t, self.tf, self.args = images, labels, teacher, teacher_flip, args

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        rng = np.random.default_rng((self.args.seed, i, int(torch.randint(0, 2**31, ()).item())))
        x, t = self.images[i], self.t[i]
        if rng.random() < 0.5:
            x, t = np.ascontiguousarray(x[:, ::-1]), self.tf[i]
        a = self.args
        x = perturb(x, rng, a.p_fullres, a.p_jpeg, a.p_shift)
        return (
            torch.from_numpy(np.ascontiguousarray(x))[None],
            torch.tensor(self.labels[i], dtype=torch.float32),
            torch.tensor(t, dtype=torch.float32),
        )


# ----------------------------------------------------------------------------------------------- measuring
def torch_logits(net, images: np.ndarray, batch: int = 64) -> np.ndarray:
    net.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(images), batch):
            out.append(net(torch.from_numpy(np.ascontiguousarray(images[s : s + batch]))[:, None]).float().numpy())
    return np.concatenate(out).astype(np.float64)


def val_report(y, logits, temperature) -> dict:
    p = M.sigmoid(logits, temperature)
    m = M.binary_metrics(y, p, 0.5)
    keep = ("auc", "accuracy", "loss", "sensitivity", "specificity")
    return {**{k: m[k] for k in keep}, "temperature": temperature}


def proxy_skew(p_clean, p_pert, threshold=0.5) -> dict:
    d = np.abs(p_pert - p_clean)
    flip = (p_pert >= threshold) != (p_clean >= threshold)
    return {
        "mean_abs_dp": float(d.mean()),
        "p99_abs_dp": float(np.quantile(d, 0.99)),
        "max_abs_dp": float(d.max()),
        "flips": int(flip.sum()),
        "far_flips": int((flip & (np.abs(p_clean - threshold) > 0.05)).sum()),
    }


def evaluate(net, val_x, y, fixed_pert, temperature=None) -> dict:
    z = torch_logits(net, val_x)
    zp = torch_logits(net, fixed_pert)
    if temperature is None:
        temperature = M.fit_operating_point(y, z, "balanced")[0]
    return {
        "validation": val_report(y, z, temperature),
        "proxy_skew_fullres_path": proxy_skew(M.sigmoid(z, temperature), M.sigmoid(zp, temperature)),
    }


# ----------------------------------------------------------------------------------------------- training
def train(args) -> None:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = load_bundle(args.model)
    train_s, val_s = bundle.training_splits(DATA)
    t0 = time.perf_counter()
    x_train, train_s, _ = load_images(train_s, 224, progress=False)
    x_val, val_s, _ = load_images(val_s, 224, progress=False)
    y_train = np.array([s.label for s in train_s], np.float32)
    y_val = np.array([s.label for s in val_s])
    onnx = Classifier(bundle, "onnx", False, False)
    teacher = onnx.logits(x_train).astype(np.float32)
    teacher_flip = onnx.logits(np.ascontiguousarray(x_train[:, :, ::-1])).astype(np.float32)
    rng = np.random.default_rng(12345)
    fixed_pert = np.stack([fullres_path(x, rng) for x in x_val])  # the same perturbed validation set before/after
    print(f"data + teacher logits: {time.perf_counter() - t0:.0f}s", flush=True)

    net = bundle.load_net()
    before = evaluate(net, x_val, y_val, fixed_pert, bundle.temperature)
    print("before", json.dumps(before), flush=True)

    split = net.set_trainable(args.unfreeze)
    prefix = torch.nn.Sequential(net.normalize, *net.body[:split]).eval()
    rest = net.body[split:]
    net.eval()  # frozen batch-norm statistics everywhere, dropout off
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=args.lr)
    n_pos = y_train.sum()
    w_pos, w_neg = len(y_train) / (2 * n_pos), len(y_train) / (2 * (len(y_train) - n_pos))
    loader = torch.utils.data.DataLoader(
        Perturbed(x_train, y_train, teacher, teacher_flip, args),
        batch_size=args.batch,
        shuffle=True,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    budget = args.minutes * 60
    total, step, warm = None, 0, 20
    started = time.perf_counter()
    log = (out / "train_log.jsonl").open("w")
    done = False
    while not done:
        for xb, yb, tb in loader:
            if total is None and step == warm:
                per_step = (time.perf_counter() - started) / warm
                total = max(warm + 1, int(budget / per_step))
                print(
                    f"{per_step:.2f}s/step -> {total} steps ({total * args.batch / len(y_train):.2f} epochs)",
                    flush=True,
                )
            lr = (
                args.lr * (step + 1) / warm
                if step < warm
                else args.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
            )
            for g in opt.param_groups:
                g["lr"] = lr
            with torch.no_grad():
                h = prefix(xb)
            s = net.head(rest(h)).squeeze(1)
            weights = torch.where(yb > 0.5, torch.tensor(w_pos), torch.tensor(w_neg))
            bce = F.binary_cross_entropy_with_logits(s, yb, weight=weights)
            cons = ((s - tb) ** 2).mean()
            loss = args.bce * bce + args.lam * cons
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % 10 == 0:
                row = {
                    "step": step,
                    "lr": lr,
                    "bce": float(bce),
                    "cons": float(cons),
                    "s": round(time.perf_counter() - started, 1),
                }
                log.write(json.dumps(row) + "\n")
                log.flush()
                if step % 50 == 0:
                    print(json.dumps(row), flush=True)
            if total is not None and step >= total:
                done = True
                break
    wall = time.perf_counter() - started
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(out / "student.safetensors"))
    after = evaluate(net, x_val, y_val, fixed_pert)
    print("after", json.dumps(after), flush=True)
    record = {
        "args": vars(args),
        "steps": step,
        "images_seen": step * args.batch,
        "train_wall_s": round(wall, 1),
        "before": before,
        "after": after,
    }
    (out / "eval.json").write_text(json.dumps(record, indent=1))


# ----------------------------------------------------------------------------------------------- bundle
def write(args) -> None:
    from safetensors.torch import load_file

    out = Path(args.out)
    bundle = load_bundle(args.model)
    net = bundle.load_net()
    net.load_state_dict(load_file(str(out / "student.safetensors")), strict=True)
    net.eval()
    _, val_s = bundle.training_splits(DATA)
    x_val, val_s, _ = load_images(val_s, 224, progress=False)
    y = np.array([s.label for s in val_s])
    z = torch_logits(net, x_val)
    temperature, threshold, rule = M.fit_operating_point(y, z, "balanced")
    p_raw, p = M.sigmoid(z), M.sigmoid(z, temperature)
    validation = M.full_report(y, p, [s.patient for s in val_s], threshold, split="validation")
    validation["ece_uncalibrated"] = M.expected_calibration_error(y, p_raw)
    validation["at_0.5"] = M.binary_metrics(y, p, 0.5)
    record = json.loads((out / "eval.json").read_text())
    config = {
        k: v
        for k, v in bundle.config.items()
        if k not in ("files", "weights_sha256", "format", "pneumoscan_version", "class_names")
    }
    config["training"] = copy.deepcopy(config["training"])
    config["training"]["stability_finetune"] = {
        "from_weights_sha256": bundle.weights_sha256,
        "script": "experiments/stability_finetune.py",
        "settings": record["args"],
        "steps": record["steps"],
        "images_seen": record["images_seen"],
        "train_wall_s": record["train_wall_s"],
    }
    config.update(
        temperature=temperature,
        threshold=threshold,
        threshold_rule=rule,
        version=time.strftime("%Y.%m.%d") + "-stab",
        notes=bundle.config.get("notes", "") + " Stability fine-tune (experiments/stability_finetune.py): "
        "self-distilled from the shipped weights on its own training patients under full-resolution-path, "
        "JPEG and sub-pixel perturbations; temperature refitted on the validation patients.",
    )
    save_bundle(out / "model", net, config, {"validation": validation})
    print(
        json.dumps(
            {
                "temperature": temperature,
                "threshold": threshold,
                "auc": validation["auc"],
                "accuracy": validation["accuracy"],
                "loss": validation["loss"],
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["train", "bundle"])
    ap.add_argument("--model", default=None, help="the bundle to start from (default: the shipped default)")
    ap.add_argument("--out", default="/work/stab-out")
    ap.add_argument("--minutes", type=float, default=28.0)
    ap.add_argument("--unfreeze", type=int, default=11)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--bce", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--p-fullres", type=float, default=0.7)
    ap.add_argument("--p-jpeg", type=float, default=0.1)
    ap.add_argument("--p-shift", type=float, default=0.1)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    train(a) if a.what == "train" else write(a)


if __name__ == "__main__":
    main()
