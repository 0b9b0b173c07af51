"""Feature heads as one concept: the interface and the registry (``model.heads.registry.HEADS``), and the claim of
docs/architecture.md that adding a head touches three files. A copy of the package gets a new head the
documented way, its own module and one entry in the registry, and nothing else; the new head is then
fitted by ``heads fit``, written into a bundle and vouched for by sha256, loaded back, applied by the
classifier, written in every output format and reported on by ``evaluate``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pneumoscan.inference import result as output
from pneumoscan.model.heads.base import Batch, FeatureHead, signed_root
from pneumoscan.model.heads.gate import Gate
from pneumoscan.model.heads.registry import HEADS, result_fields
from pneumoscan.model.heads.subtype import SubtypeHead
from pneumoscan.model.schema import ANSWER_FILES, MAX_FILE_BYTES

SRC = Path(__file__).parents[1] / "src" / "pneumoscan"

# The new head: the distance of an image's pooled features from the training images' mean, in training
# standard deviations; it reports its median on labelled images.
DUMMY_HEAD = '''
"""A feature head for the test: how far an image's pooled features lie from the training images' mean."""

from __future__ import annotations

import numpy as np

from pneumoscan.core.errors import ConfigError
from pneumoscan.model.heads.base import (
    Batch, Evaluation, FeatureHead, FitData, Fitted, ResultField, read_safetensors, signed_root,
)


class DistanceHead(FeatureHead):
    name = "distance"
    filename = "distance.safetensors"
    description = "the feature distance"
    fields = (ResultField("feature_distance", "feature distance", 3),)

    def __init__(self, mean: np.ndarray, scale: float):
        self.mean, self.scale = mean, scale

    @classmethod
    def from_training(cls, data: FitData) -> Fitted:
        x = signed_root(data.features("train"))
        mean = x.mean(axis=0)
        head = cls(mean, float(np.sqrt(((x - mean) ** 2).sum(axis=1)).mean()))
        report = {"n": len(data.val_samples), "distance_median": float(np.median(head.distance(data.features("val"))))}
        return Fitted(head, report, [f"distance head: scale {head.scale:.3f}"])

    def distance(self, features: np.ndarray) -> np.ndarray:
        return np.sqrt(((signed_root(features) - self.mean) ** 2).sum(axis=1)) / self.scale

    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        arrays = {"mean": self.mean.astype(np.float32), "scale": np.array([self.scale], np.float32)}
        return save(arrays, metadata={"format": "test-distance/1"})

    @classmethod
    def load(cls, path, n_features=None):
        arrays, metadata = read_safetensors(path, "distance head")
        if metadata.get("format") != "test-distance/1":
            raise ConfigError(f"{path}: not a distance head")
        return cls(arrays["mean"], float(arrays["scale"][0]))

    def apply(self, batch: Batch) -> list[dict]:
        return [{"feature_distance": float(d)} for d in self.distance(batch.features)]

    def evaluate(self, data: Evaluation) -> dict | None:
        return {"n": len(data.samples), "distance_median": float(np.median(self.distance(data.features)))}

    @classmethod
    def report_lines(cls, report: dict, n: int) -> list[str]:
        return [f"feature distance: median {report['distance_median']:.3f} over {report['n']} images"]
'''

# What the copy of the package then does, end to end (run with the copy first on sys.path).
SCENARIO = """
import csv, io, json, sys, warnings
from pathlib import Path

import pneumoscan
assert Path(pneumoscan.__file__).parent == Path(sys.argv[1]), pneumoscan.__file__
from pneumoscan import Classifier
from pneumoscan.cli.main import main
from pneumoscan.core.errors import ConfigError
from pneumoscan.evaluation.evaluate import evaluate, metrics_table
from pneumoscan.inference import output, result
from pneumoscan.io.dataset import list_images
from pneumoscan.model.schema import ANSWER_FILES
from pneumoscan.model.store import load_bundle

bundle_path, data = Path(sys.argv[2]), Path(sys.argv[3])
seen = {"answer_files": list(ANSWER_FILES), "fields": list(result.FIELDS), "csv": list(result.CSV_COLUMNS)}
seen["page_fields"] = [f["name"] for f in result.field_list()]
seen["heads_fit_exit"] = main(["heads", "fit", str(bundle_path), "--data", str(data), "--only", "distance", "--quiet"])
bundle = load_bundle(bundle_path)  # checks every recorded sha256
seen["recorded"] = sorted(bundle.config["files"])
seen["validation_report"] = bundle.metrics["validation"].get("distance")
seen["loaded_heads"] = list(bundle.load_heads())
clf = Classifier.load(bundle_path, gate=False)
files = sorted(list_images(data / "test"))[:6]
results = clf.predict(files)
seen["records"] = [r.to_dict() for r in results]
stream = io.StringIO()
output.write_predictions(results, "csv", stream)
seen["csv_rows"] = list(csv.DictReader(io.StringIO(stream.getvalue())))
summary = evaluate(data, "test", [str(bundle_path)], sys.argv[4], n_resamples=20, progress=False)
seen["evaluated"] = summary["models"][0]["distance"]
seen["table"] = metrics_table(summary["models"][0])
seen["metrics_json"] = json.loads((Path(sys.argv[4]) / "metrics.json").read_text()).get("distance")
(bundle_path / "distance.safetensors").write_bytes(b"tampered")
try:
    load_bundle(bundle_path)
    seen["tampered"] = "loaded"
except ConfigError as exc:
    seen["tampered"] = str(exc)
print("SEEN " + json.dumps(seen))
"""


def test_the_registry_holds_the_gate_then_the_subtype_head():
    assert list(HEADS) == ["gate", "subtype"] and HEADS["gate"] is Gate and HEADS["subtype"] is SubtypeHead
    assert all(issubclass(head, FeatureHead) for head in HEADS.values())
    for head in HEADS.values():
        assert head.filename in ANSWER_FILES and MAX_FILE_BYTES[head.filename] == head.max_bytes
    names = [f.name for f in result_fields()]
    assert names == ["gate_score", "gate_limit", "gate", "subtype", "viral_probability"]
    assert output.FIELDS == ("path", "probability", "label", "threshold", "error", *names, "warnings")
    assert "gate_limit" not in output.CSV_COLUMNS and output.DIGITS["viral_probability"] == 6


def test_one_signed_root_for_both_heads():
    x = np.array([[4.0, -9.0, 0.0]])
    assert signed_root(x).tolist() == [[2.0, -3.0, 0.0]]
    import pneumoscan.model.heads.gate as gate
    import pneumoscan.model.heads.subtype as subtype

    assert not hasattr(gate, "_root") and not hasattr(subtype, "_transform")


def test_a_refusing_head_keeps_its_fields_only(trained_bundle):
    from pneumoscan.inference.classifier import Classifier

    clf = Classifier(trained_bundle, gate=True)
    images = np.zeros((2, trained_bundle.image_size, trained_bundle.image_size), np.uint8)
    images[1] = np.tile(np.linspace(0, 255, trained_bundle.image_size, dtype=np.uint8), (trained_bundle.image_size, 1))
    logits, features = clf.engine.run(images)
    refused = clf.results(["flat", "ramp"], logits, features, gating=True, images=images)
    assert all(not r.ok and r.error.startswith("does not look like a chest X-ray") for r in refused)
    assert all(set(r.to_dict()) == {"path", "error", "gate_score", "gate_limit"} for r in refused)
    labelled = clf.results(["flat", "ramp"], logits, features, gating=False, images=images)
    assert all(r.ok and r.to_dict()["gate"] == "off" and r.gate_score > 1 for r in labelled)
    batch = Batch(images, features, clf.probabilities(logits), [r.label for r in labelled], "torch", None, True)
    assert [set(fields) for fields in clf.gate.apply(batch)] == [{"gate_score", "gate_limit", "error"}] * 2


@pytest.mark.data
def test_a_new_head_touches_its_module_and_the_registry_only(trained_bundle, small_data, tmp_path):
    package = tmp_path / "src" / "pneumoscan"
    shutil.copytree(SRC, package, ignore=shutil.ignore_patterns("default_model", "__pycache__"))
    (package / "model" / "heads" / "distance.py").write_text(textwrap.dedent(DUMMY_HEAD))
    registry = package / "model" / "heads" / "registry.py"
    text = registry.read_text()
    entry = "(Gate, SubtypeHead)"
    assert text.count(entry) == 1  # the registry's one line a new head is added to
    text = text.replace(entry, "(Gate, SubtypeHead, DistanceHead)")
    registry.write_text(
        text.replace(
            "from pneumoscan.model.heads.gate import Gate\n",
            "from pneumoscan.model.heads.distance import DistanceHead\nfrom pneumoscan.model.heads.gate import Gate\n",
        )
    )
    changed = [p.name for p in package.rglob("*.py") if not (SRC / p.relative_to(package)).exists()]
    changed += [
        p.name
        for p in package.rglob("*.py")
        if (SRC / p.relative_to(package)).exists() and p.read_bytes() != (SRC / p.relative_to(package)).read_bytes()
    ]
    assert sorted(changed) == ["distance.py", "registry.py"]

    bundle = shutil.copytree(trained_bundle.path, tmp_path / "model")
    command = [sys.executable, "-c", SCENARIO, str(package), str(bundle), str(small_data), str(tmp_path / "evaluation")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env={**_env(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("SEEN "))[5:])

    assert "distance.safetensors" in seen["answer_files"]  # the bundle may hold it, and vouches for it
    assert seen["fields"][-2:] == ["feature_distance", "warnings"] and "feature_distance" in seen["csv"]
    assert "feature_distance" in seen["page_fields"]  # GET /v1/fields, what the service's page renders
    assert seen["heads_fit_exit"] == 0
    assert "distance.safetensors" in seen["recorded"] and seen["loaded_heads"] == ["gate", "subtype", "distance"]
    assert seen["validation_report"]["n"] > 0 and seen["validation_report"]["distance_median"] > 0
    assert len(seen["records"]) == 6
    for record in seen["records"]:
        assert list(record)[-1] in ("feature_distance", "warnings") and record["feature_distance"] > 0
        assert list(record).index("feature_distance") > list(record).index("gate_score")
    assert [float(row["feature_distance"]) for row in seen["csv_rows"]] == pytest.approx(
        [r["feature_distance"] for r in seen["records"]], abs=1e-3
    )
    assert seen["evaluated"]["n"] == 80 and seen["evaluated"]["distance_median"] > 0
    assert seen["metrics_json"] == seen["evaluated"] and "feature distance: median" in seen["table"]
    assert "sha256 does not match" in seen["tampered"]


def _env(tmp_path: Path) -> dict:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(tmp_path / "src")
    env.setdefault("PNEUMOSCAN_CACHE", str(tmp_path / "cache"))
    return env
