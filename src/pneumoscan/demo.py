"""``pneumoscan demo``: the bundled model on the bundled examples, offline, in seconds."""

from __future__ import annotations

from pathlib import Path

from .data import load_split
from .inference import Classifier
from .output import write_cams

EXAMPLES = Path(__file__).parent / "examples"


def run_demo(out: Path) -> int:
    from .evaluation import evaluate, metrics_table

    clf = Classifier.load()
    samples = load_split(EXAMPLES)
    results = clf.predict([s.path for s in samples])
    print(f"{clf.bundle.name} ({clf.engine.name}), threshold {clf.threshold:.4f}")
    print(f"{'true':<10} {'predicted':<10} {'probability':>11}  file")
    for sample, r in zip(samples, results):
        mark = "" if r.label == sample.label_name else "  <- wrong"
        print(f"{sample.label_name:<10} {r.label:<10} {r.probability:>11.4f}  {sample.path.name}{mark}")
    summary = evaluate(EXAMPLES, None, None, out, n_resamples=2000, progress=False)
    print(metrics_table(summary["models"][0]))
    cams = write_cams(clf, results, out / "gradcam")
    print(f"\nreport: {out / 'report.html'}\nGrad-CAM overlays: {len(cams)} in {out / 'gradcam'}")
    print("These 16 images are the official Kermany val split (Kermany et al. 2018, CC BY 4.0), not used in training.")
    return 0
