"""Whether a bundle's int8 model answers as its float32 model does, and so which one runs by default.

``export --int8`` measures the two graphs on the bundle's own validation films (the patients its recipe
held out of train; never the test split) and records the result in config.json as ``int8``: how many
films, label agreement at the bundle's threshold, mean and largest probability difference, the AUC of
each and the input gate's verdicts. The record names the sha256 of the int8 file it measured. A bundle
runs int8 by default (predict, serve, listen, evaluate) only where that record meets :data:`MUST` for the
int8 file the bundle holds now; anything else runs fp32 and :func:`int8_status` says why.

Light on purpose (numpy only): the engine choice reads it at every start.
"""

from __future__ import annotations

import math
import re

import numpy as np

# What int8 must meet, against fp32 on the same films, to be a bundle's default engine.
# At least 200 films, so that 99.5% agreement can tell one disagreement from none.
MUST = {"films": 200, "labels_agree": 0.995, "mean_abs_dp": 0.005, "auc_difference": 0.002, "gate_verdicts_differ": 0}
REAL = (float, int)
RECORD_KEYS = {
    "sha256": str,
    "films": int,
    "source": str,
    "labels_agree": REAL,
    "mean_abs_dp": REAL,
    "max_abs_dp": REAL,
    "auc_fp32": (*REAL, type(None)),
    "auc_int8": (*REAL, type(None)),
    "gate_verdicts_differ": (int, type(None)),
}


def agreement(
    p_fp32: np.ndarray,
    p_int8: np.ndarray,
    threshold: float,
    labels: np.ndarray | None = None,
    refused_fp32: np.ndarray | None = None,
    refused_int8: np.ndarray | None = None,
) -> dict:
    """How far int8's probabilities are from fp32's on the same films: label agreement at ``threshold``,
    mean and largest |dp|, the AUC of each (with ``labels``) and how many gate verdicts differ."""
    from pneumoscan.core.metrics import roc_auc

    p_fp32, p_int8 = np.asarray(p_fp32, np.float64), np.asarray(p_int8, np.float64)
    difference = np.abs(p_int8 - p_fp32)
    two_classes = labels is not None and len(set(np.asarray(labels).tolist())) == 2
    return {
        "films": int(len(p_fp32)),
        "labels_agree": float(np.mean((p_fp32 >= threshold) == (p_int8 >= threshold))),
        "mean_abs_dp": float(difference.mean()),
        "max_abs_dp": float(difference.max()),
        "auc_fp32": float(roc_auc(labels, p_fp32)) if two_classes else None,
        "auc_int8": float(roc_auc(labels, p_int8)) if two_classes else None,
        "gate_verdicts_differ": None if refused_fp32 is None else int(np.sum(refused_fp32 != refused_int8)),
    }


def shortfall(measured: dict) -> str | None:
    """What a measured agreement misses of :data:`MUST`, in words; None when it meets it."""
    misses = []
    if measured["films"] < MUST["films"]:
        misses.append(f"measured on {measured['films']} films (must {MUST['films']})")
    if measured["labels_agree"] < MUST["labels_agree"]:
        misses.append(f"labels agree on {measured['labels_agree']:.2%} (must {MUST['labels_agree']:.1%})")
    if measured["mean_abs_dp"] > MUST["mean_abs_dp"]:
        misses.append(f"mean |dp| {measured['mean_abs_dp']:.4f} (must {MUST['mean_abs_dp']})")
    auc_fp32, auc_int8 = measured.get("auc_fp32"), measured.get("auc_int8")
    if auc_fp32 is not None and auc_int8 is not None and abs(auc_int8 - auc_fp32) > MUST["auc_difference"]:
        misses.append(f"AUC differs by {auc_int8 - auc_fp32:+.4f} (must {MUST['auc_difference']})")
    if (measured.get("gate_verdicts_differ") or 0) > MUST["gate_verdicts_differ"]:
        misses.append(f"{measured['gate_verdicts_differ']} gate verdicts differ")
    return "; ".join(misses) or None


def int8_status(config: dict) -> tuple[bool, str]:
    """(whether the bundle with this config.json runs int8 by default, why, in one line)."""
    int8_file = config.get("files", {}).get("model.int8.onnx")
    record = config.get("int8")
    if int8_file is None:
        return False, "no int8 model"
    if record is None:
        return False, "int8 not measured against fp32 (pneumoscan export --int8 measures it)"
    if record.get("sha256") != int8_file:
        return False, "int8 model changed since it was measured against fp32 (export --int8 again)"
    missed = shortfall(record)
    if missed:
        return False, f"int8 not shown to answer as fp32 on {record['films']} validation films: {missed}"
    return True, (
        f"int8 agrees with fp32 on {record['films']} validation films: labels {record['labels_agree']:.2%}, "
        f"mean |dp| {record['mean_abs_dp']:.4f}, largest {record['max_abs_dp']:.3f}"
    )


def check_record(record, where: str) -> None:
    """config.json ``int8``: every key of :data:`RECORD_KEYS` with its type (a bundle comes from anywhere)."""
    from pneumoscan.core.errors import ConfigError

    if not isinstance(record, dict) or set(record) != set(RECORD_KEYS):
        raise ConfigError(f"{where}: config.json 'int8' must hold exactly {', '.join(RECORD_KEYS)}")
    for key, types in RECORD_KEYS.items():
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, types) or (isinstance(value, str) and len(value) > 200):
            raise ConfigError(f"{where}: config.json 'int8.{key}' has the wrong type")
    if not re.fullmatch("[0-9a-f]{64}", record["sha256"]):
        raise ConfigError(f"{where}: config.json 'int8.sha256' is not a sha256 hex digest")
    numbers = {k: v for k, v in record.items() if isinstance(v, REAL)}
    if not all(math.isfinite(v) for v in numbers.values()):
        raise ConfigError(f"{where}: config.json 'int8' holds a number that is not finite")
    aucs = [record[k] for k in ("auc_fp32", "auc_int8") if record[k] is not None]
    differ = record["gate_verdicts_differ"]
    if (
        record["films"] < 1
        or not 0 <= record["labels_agree"] <= 1
        or not 0 <= record["mean_abs_dp"] <= record["max_abs_dp"] <= 1
        or not all(0 <= auc <= 1 for auc in aucs)
        or (differ is not None and not 0 <= differ <= record["films"])
    ):
        raise ConfigError(f"{where}: config.json 'int8' holds a count, share or difference out of range")
