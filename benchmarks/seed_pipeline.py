"""`pneumoscan predict` against the seed notebook's pipeline re-created in eager PyTorch, whole process each.

    python benchmarks/seed_pipeline.py [--rounds 3]

The seed: a fresh Python process (``--seed-worker``, this file) that imports torch and torchvision, builds
torchvision's MobileNetV2 with the seed's Keras transfer-learning head (global average pool, Dense 128 relu,
dropout, Dense 1 sigmoid), eval mode and ``torch.no_grad``, reads each JPEG with PIL, converts it to RGB,
resizes it to 150x150, scales it to [0, 1], runs batches of 32 and writes one probability per file to a CSV
file. The weights are random (``weights=None``: nothing downloads); the time does not depend on their
values. The candidate: ``pneumoscan predict TEST --format csv --output FILE`` with the bundled default model.

Both read the 624 official test JPEGs (224 px copies) for speed only: no labels, no metrics. Each is timed
as a whole process, imports included, with peak RSS (VmHWM) as in harness.py and CPU seconds (user + system
of the waited child). Beside them, the same ``predict --fp32`` and a TorchXRayVision-style pipeline
(``--xrv-worker``: DenseNet-121 on one grey channel, 224 px, batch 8, random weights). One unmeasured
run of each warms the page cache (and pneumoscan's ONNX cache); then they alternate for --rounds rounds.
Medians; the ratio is the seed's wall time over each row's.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from harness import interleaved, medians, run_child, table

SEED_SIZE = 150
SEED_BATCH = 32
XRV_SIZE, XRV_BATCH = 224, 8
MUST_RATIO = 3.0
MUST_MEMORY = 0.25
_SUFFIXES = {".jpeg", ".jpg", ".png"}


def seed_worker(folder: Path, output: Path) -> None:
    """The seed notebook's inference re-created in eager PyTorch: one probability per image into OUTPUT."""
    import numpy as np
    import torch
    import torchvision
    from PIL import Image

    model = torchvision.models.mobilenet_v2(weights=None)  # random weights: same speed, nothing to download
    # Keras: base model -> GlobalAveragePooling2D -> Dense(128, relu) -> Dropout -> Dense(1, sigmoid).
    # torchvision's forward already pools and flattens the features before `classifier`.
    model.classifier = torch.nn.Sequential(
        torch.nn.Linear(model.last_channel, 128),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.5),
        torch.nn.Linear(128, 1),
        torch.nn.Sigmoid(),
    )
    model.eval()
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in _SUFFIXES)
    with torch.no_grad(), open(output, "w") as out:
        out.write("path,probability\n")
        for start in range(0, len(files), SEED_BATCH):
            chunk = files[start : start + SEED_BATCH]
            arrays = []
            for path in chunk:
                with Image.open(path) as img:
                    rgb = img.convert("RGB").resize((SEED_SIZE, SEED_SIZE))
                arrays.append(np.asarray(rgb, dtype=np.float32) / 255.0)
            batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
            probs = model(batch)[:, 0].tolist()
            out.writelines(f"{path},{p:.6f}\n" for path, p in zip(chunk, probs))


def xrv_worker(folder: Path, output: Path) -> None:
    """A TorchXRayVision-style pipeline in eager PyTorch: DenseNet-121 on one grey channel at 224 px, each
    image scaled to [-1024, 1024] as TorchXRayVision does, batches of 8, one probability per image."""
    import numpy as np
    import torch
    import torchvision
    from PIL import Image

    model = torchvision.models.densenet121(weights=None, num_classes=1)  # random weights: same speed
    model.features.conv0 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    model.eval()
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in _SUFFIXES)
    with torch.no_grad(), open(output, "w") as out:
        out.write("path,probability\n")
        for start in range(0, len(files), XRV_BATCH):
            chunk = files[start : start + XRV_BATCH]
            arrays = []
            for path in chunk:
                with Image.open(path) as img:
                    grey = img.convert("L").resize((XRV_SIZE, XRV_SIZE))
                arrays.append((np.asarray(grey, dtype=np.float32) / 255.0) * 2048 - 1024)
            batch = torch.from_numpy(np.stack(arrays))[:, None].contiguous()
            probs = torch.sigmoid(model(batch)[:, 0]).tolist()
            out.writelines(f"{path},{p:.6f}\n" for path, p in zip(chunk, probs))


def _cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _rows(csv: Path) -> int:
    with open(csv) as f:
        return sum(1 for line in f if line.strip()) - 1  # less the header


def measure(module: str, args: list[str], output: Path, expected: int, env: dict | None = None) -> tuple:
    """(wall s, peak RSS MB, CPU s) of one whole process that must write EXPECTED rows to OUTPUT."""
    output.unlink(missing_ok=True)
    cpu = _cpu_children()
    wall, rss = run_child(module, args, env=env)
    cpu = _cpu_children() - cpu
    rows = _rows(output)
    if rows != expected:
        raise SystemExit(f"{module} wrote {rows} rows to {output}, expected {expected}")
    return wall, rss, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--no-xrv", action="store_true", help="leave out the DenseNet-121 pipeline (the slowest)")
    parser.add_argument("--seed-worker", nargs=2, metavar=("FOLDER", "OUTPUT"), help=argparse.SUPPRESS)
    parser.add_argument("--xrv-worker", nargs=2, metavar=("FOLDER", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.seed_worker:
        seed_worker(Path(args.seed_worker[0]), Path(args.seed_worker[1]))
        return
    if args.xrv_worker:
        xrv_worker(Path(args.xrv_worker[0]), Path(args.xrv_worker[1]))
        return

    from pneumoscan.io.dataset import list_images, shared_data_root

    folder = shared_data_root().resolve() / "chest_xray_224" / "test"
    n = len(list_images(folder))
    here = Path(__file__).resolve().parent
    seed_env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(here), os.environ.get("PYTHONPATH")])))
    tmp = Path(tempfile.mkdtemp(prefix="seed_pipeline_"))
    seed_out, cand_out, fp32_out, xrv_out = (tmp / f"{k}.csv" for k in ("seed", "pneumoscan", "fp32", "xrv"))
    seed_name = f"seed: MobileNetV2 {SEED_SIZE} px, PyTorch eager, batch {SEED_BATCH}"
    cand_name = "pneumoscan predict (default model, its default engine)"
    cases = {
        seed_name: lambda: measure("seed_pipeline", ["--seed-worker", folder, seed_out], seed_out, n, seed_env),
        cand_name: lambda: measure(
            "pneumoscan.cli", ["predict", folder, "--format", "csv", "--output", cand_out], cand_out, n
        ),
        "pneumoscan predict --fp32": lambda: measure(
            "pneumoscan.cli", ["predict", folder, "--fp32", "--format", "csv", "--output", fp32_out], fp32_out, n
        ),
    }
    if not args.no_xrv:
        cases[f"TorchXRayVision-style DenseNet-121 {XRV_SIZE} px, eager, batch {XRV_BATCH}"] = lambda: measure(
            "seed_pipeline", ["--xrv-worker", folder, xrv_out], xrv_out, n, seed_env
        )
    load_before = os.getloadavg()
    for run in cases.values():
        run()  # warm the page cache and pneumoscan's ONNX cache; not counted
    results = interleaved(cases, args.rounds)
    load_after = os.getloadavg()
    shutil.rmtree(tmp)  # the CSV files and pneumoscan's manifest beside its output

    walls = {name: [r[0] for r in rs] for name, rs in results.items()}
    wall = medians(walls)
    rss = medians({name: [r[1] for r in rs] for name, rs in results.items()})
    cpu = medians({name: [r[2] for r in rs] for name, rs in results.items()})
    ref = wall[seed_name]
    rows = [
        [name, f"{wall[name]:.2f}", f"{n / wall[name]:.0f}", f"{1000 * wall[name] / n:.1f}", f"{cpu[name]:.2f}",
         f"{rss[name]:.0f}", f"{ref / wall[name]:.2f}x"]
        for name in cases
    ]  # fmt: skip
    ratio = ref / wall[cand_name]
    per_round = [s / c for s, c in zip(walls[seed_name], walls[cand_name])]
    print(
        f"Whole process over {n} test images (224 px JPEG), medians of {args.rounds} interleaved rounds, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after\n"
    )
    header = ["pipeline", "wall s", "images/s", "wall ms/image", "CPU s", "peak RSS MB", "seed wall / wall"]
    print(table(header, rows))
    print(f"\nper-round ratio (seed wall / pneumoscan wall): {', '.join(f'{r:.2f}' for r in per_round)}")
    verdict = "met" if ratio >= MUST_RATIO else "NOT met"
    print(f"must: pneumoscan at least {MUST_RATIO}x the seed: {verdict} ({ratio:.2f}x)")
    memory = rss[cand_name] / rss[seed_name]
    verdict = "met" if memory <= MUST_MEMORY else "NOT met"
    print(f"must: pneumoscan's peak memory at most {MUST_MEMORY:.2f} of the seed's: {verdict} ({memory:.2f})")


if __name__ == "__main__":
    sys.exit(main())
