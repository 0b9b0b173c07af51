"""The input gate, measured on every engine: what it refuses, what it warns about, what it keeps.

    python benchmarks/gate_ood.py [--model BUNDLE] [--n 12] [--seed 1000] [--test]

- Generated kinds (tests/ood.py, this seed: other examples than the tests'): non-X-rays (flat fields,
  gradients, vignettes, blurred scenes, text pages, noise, colour scenes), inputs made from real films
  that must be refused (rotated, inverted, photos of monitors, page screenshots, two films side by side,
  one-lung crops), and the fixed sets (photographs, CT and MR, documents, noise and blanks, screenshots,
  plots). Per engine: the share refused and the smallest margin (gate score over its limit, 1).
- Degraded real films (colour tint, strong gamma, brightened, darkened, heavy blur, text overlay, wide
  padding) made from the official val films at full resolution: the share warned, the share whose
  probability stays within 0.1 of the clean film's, and the share with either (or refused).
- The bundle's validation X-rays (carved from train by patient), clean and under shift.py's
  perturbations: the share refused per engine.
- With --test, the official test split: the share refused per engine. A test-split read: ledger it in
  test_reads.csv, and choose nothing on it.
- Cost: the gate's check (statistics, orientation, features) per image against the default engine's
  forward pass on the same batches of 8, interleaved, medians (an upper bound on its share of `predict`,
  which also decodes).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import ood  # noqa: E402
from harness import timed, timed_call  # noqa: E402

from pneumoscan import Classifier  # noqa: E402
from pneumoscan.io.dataset import load_images, load_split, shared_data_root  # noqa: E402
from pneumoscan.io.images import load_image, prepare_with_chroma  # noqa: E402
from pneumoscan.model.heads.gate import gate_images  # noqa: E402

ENGINES = {"ONNX fp32": {"fp32": True}, "ONNX int8": {"int8": True}, "PyTorch": {"engine": "torch"}}


def judge(clf: Classifier, images: np.ndarray, chroma: list[float] | None = None):
    """Probabilities and gate verdicts of prepared images."""
    logits, features = clf.outputs(images)
    return clf.probabilities(logits), clf.gate_verdicts(images, features, chroma)


def prepared(inputs: dict[str, bytes], size: int) -> tuple[np.ndarray, list[float]]:
    pairs = [prepare_with_chroma(io.BytesIO(data), size) for data in inputs.values()]
    return np.stack([p[0] for p in pairs]), [p[1] for p in pairs]


def refused_cell(verdicts) -> str:
    scores = np.array([v.score for v in verdicts])
    return f"{np.mean(scores > 1):.0%}, {scores.min():.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="bundle (default: the bundled model)")
    parser.add_argument("--n", type=int, default=12, help="generated inputs per kind (default 12)")
    parser.add_argument("--seed", type=int, default=1000, help="seed of the generated inputs (default 1000)")
    parser.add_argument("--test", action="store_true", help="also read the official test split (ledger it)")
    args = parser.parse_args()
    clfs = {name: Classifier.load(args.model, **kw) for name, kw in ENGINES.items()}
    first = next(iter(clfs.values()))
    size, data = first.image_size, shared_data_root().resolve() / "chest_xray_224"
    films = [np.asarray(load_image(p)) for p in sorted((shared_data_root() / "val_fullres").rglob("*.jpeg"))]
    header = " | ".join(clfs)
    print(f"Input gate of {first.bundle.name}; cells: share refused, smallest margin (score / limit)\n")
    print(f"| kind | inputs | {header} |\n|---|---|{'---|' * len(clfs)}")
    sets = {k: ood.generate(k, args.n, args.seed) for k in ood.GENERATED}
    sets |= {k: ood.generate(k, args.n, args.seed, films) for k in ood.FROM_FILMS}
    sets |= {k: make() for k, make in {**ood.MUST_REFUSE, **ood.REPORTED}.items()}
    for kind, inputs in sets.items():
        images, chroma = prepared(inputs, size)
        cells = [refused_cell(judge(clf, images, chroma)[1]) for clf in clfs.values()]
        print(f"| {kind} | {len(images)} | {' | '.join(cells)} |")

    print("\nDegraded real films; cells: share warned, share within 0.1 of the clean film, share with either")
    print("(a refusal counts as either)\n")
    print(f"| kind | films | {header} |\n|---|---|{'---|' * len(clfs)}")
    clean = np.stack([prepared({"f": ood.enc(f)}, size)[0][0] for f in films])
    p_clean = {name: judge(clf, clean)[0] for name, clf in clfs.items()}
    for kind in ood.DEGRADED:
        images, chroma = prepared(ood.generate(kind, len(films), args.seed, films), size)
        cells = []
        for name, clf in clfs.items():
            p, verdicts = judge(clf, images, chroma)
            warned = np.array([bool(v.warnings) or not v.accepted for v in verdicts])
            stable = np.abs(p - p_clean[name]) <= 0.1
            cells.append(f"{warned.mean():.0%}, {stable.mean():.0%}, {(warned | stable).mean():.0%}")
        print(f"| {kind} | {len(images)} | {' | '.join(cells)} |")

    train, val = first.bundle.training_splits(data)
    train_images = load_images(train, size, progress=False)[0]
    val_images = load_images(val, size, progress=False)[0]
    calibration = gate_images(train_images, val_images, first.bundle.config["training"]["recipe"]["seed"])[1]
    rows = {"validation X-rays, clean and perturbed": calibration}
    if args.test:
        samples = load_split(data, "test")
        rows["official test split (one ledgered read)"] = load_images(samples, size, progress=False)[0]
    print(f"\n| X-rays | images | {header} (share refused) |\n|---|---|{'---|' * len(clfs)}")
    refused = {what: [] for what in rows}
    for clf in clfs.values():
        for what, images in rows.items():
            refused[what].append(np.array([not v.accepted for v in judge(clf, images)[1]]))
    clean = {
        "validation X-rays, clean": [r[: len(val_images)] for r in refused["validation X-rays, clean and perturbed"]]
    }
    for what, shares in {**clean, **refused}.items():
        print(f"| {what} | {len(shares[0])} | {' | '.join(f'{r.mean():.2%} ({r.sum()})' for r in shares)} |")
    print_cost(first, val_images)


def print_cost(clf: Classifier, images: np.ndarray, rounds: int = 20) -> None:
    engine, gate = [], []
    for r in range(rounds):
        batch = images[8 * r : 8 * r + 8]
        seconds, (_, features) = timed_call(lambda batch=batch: clf.engine.run(batch))
        engine.append(seconds)
        gate.append(
            timed(lambda batch=batch, features=features: clf.gate_verdicts(batch, features, [0.0] * len(batch)))
        )
    e, g = statistics.median(engine) / 8 * 1000, statistics.median(gate) / 8 * 1000
    print(f"\nCost per image ({clf.engine.name}, batches of 8): forward pass {e:.1f} ms, gate {g:.2f} ms ({g / e:.1%})")


if __name__ == "__main__":
    main()
