"""Forward speed of the frozen backbone, the cost that bounds the frozen training phase.

    python experiments/frozen_trunk.py [--size 224] [--batch 32] [--repeats 5]

Eager PyTorch (the baseline), the frozen TorchScript trunk that training uses
(`pneumoscan.training.trainer.compile_frozen`), `torch.compile`, and ONNX Runtime, all in this process on
the same random batch; medians of ``--repeats`` timed passes after a warm-up.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time
import warnings

import torch
from torch import nn

from pneumoscan.model.networks import create_model
from pneumoscan.training.trainer import compile_frozen


def images_per_s(forward, x: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        forward(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            forward(x)
            times.append(time.perf_counter() - start)
    return len(x) / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224, help="image size (224)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per path (5)")
    args = parser.parse_args()

    net = create_model().eval()
    trunk = nn.Sequential(net.normalize, *net.body).eval()  # everything the frozen phase does not train
    x = torch.randint(0, 256, (args.batch, 1, args.size, args.size), dtype=torch.uint8)
    rows = {"eager (baseline)": images_per_s(trunk, x, args.repeats)}
    rows["frozen TorchScript (training's trunk)"] = images_per_s(compile_frozen(trunk, x[:2]), x, args.repeats)
    start = time.perf_counter()
    compiled = torch.compile(trunk)
    with torch.inference_mode():
        compiled(x)
    compile_seconds = time.perf_counter() - start
    rows[f"torch.compile (first call {compile_seconds:.0f} s)"] = images_per_s(compiled, x, args.repeats)

    import onnxruntime as ort

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(trunk, (x[:1],), buf, dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "n"}})
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    session = ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])
    rows["ONNX Runtime (no autograd)"] = images_per_s(lambda t: session.run(None, {"x": t.numpy()}), x, args.repeats)

    base = rows["eager (baseline)"]
    print(f"Frozen EfficientNet-Lite0 forward, batch {args.batch}, {args.size} px, {os.cpu_count()} cores")
    print("| path | images/s | ratio to eager |\n|---|---|---|")
    for name, rate in rows.items():
        print(f"| {name} | {rate:.0f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
