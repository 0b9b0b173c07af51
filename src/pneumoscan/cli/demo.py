"""``pneumoscan demo``: the bundled model on the bundled examples, offline, in seconds."""

from __future__ import annotations

from pathlib import Path

from pneumoscan.core.metrics import HEADLINE
from pneumoscan.core.package import PACKAGE
from pneumoscan.core.text import printable, with_ci
from pneumoscan.inference.classifier import Classifier
from pneumoscan.inference.output import write_cams
from pneumoscan.io.dataset import load_split
from pneumoscan.model.card import GENERALISATION_NOTE

EXAMPLES = PACKAGE / "examples"


def recorded_metrics(bundle) -> str:
    """The bundle's recorded validation and held-out test numbers side by side, with what they predict."""
    lines = ["Recorded metrics of this model (95% intervals by patient):"]
    for split, label in (("validation", "validation (training hospital)"), ("test", "held-out test split")):
        report = bundle.metrics.get(split)
        if report:
            numbers = ", ".join(f"{k} {with_ci(report, k)}" for k in HEADLINE)
            lines.append(f"  {label}, {report['n']} images: {numbers}")
    return "\n".join([*lines, GENERALISATION_NOTE])


def run_demo(out: Path) -> int:
    from pneumoscan.evaluation.evaluate import evaluate, metrics_table

    clf = Classifier.load()
    samples = load_split(EXAMPLES)
    results = clf.predict([s.path for s in samples])
    rule = clf.bundle.config.get("threshold_rule")
    print(f"{printable(clf.bundle.name)} ({clf.engine.name}), threshold {clf.threshold:.4f} ({rule})")
    print(f"{'true':<10} {'predicted':<10} {'probability':>11}  file")
    for sample, r in zip(samples, results):
        mark = "" if r.label == sample.label_name else "  <- wrong"
        print(f"{sample.label_name:<10} {r.label:<10} {r.probability:>11.4f}  {sample.path.name}{mark}")
    summary = evaluate(EXAMPLES, None, None, out, n_resamples=2000, progress=False)
    print(metrics_table(summary["models"][0]))
    print(recorded_metrics(clf.bundle))
    cams = write_cams(clf, results, out / "gradcam")
    print(f"\nreport: {out / 'report.html'}\nGrad-CAM overlays: {len(cams)} in {out / 'gradcam'}")
    print("These 16 images are the official Kermany val split (Kermany et al. 2018, CC BY 4.0), not used in training.")
    return 0
