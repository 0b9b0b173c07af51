"""The feature heads there are, declared once: :data:`HEADS`, in the order their result fields appear.

A head implements :class:`pneumoscan.feature_head.FeatureHead`. Everything else reads this table: the
bundle (which files it may hold and vouches for, ``Bundle.load_heads``), training and ``heads fit``
(:func:`fit_heads_on`), inference (``Classifier`` applies every head the bundle has), the output record
(``output.FIELDS``, hence the service's fields and its page), evaluation (each head's report) and
``heads fit --only``. Adding a head is its module and one entry here.
"""

from __future__ import annotations

from .feature_head import FeatureHead, FitData, ResultField
from .gate import Gate
from .subtype import SubtypeHead

HEADS: dict[str, type[FeatureHead]] = {head.name: head for head in (Gate, SubtypeHead)}


def head_files() -> tuple[str, ...]:
    """The heads' file names in a bundle, in HEADS order."""
    return tuple(head.filename for head in HEADS.values())


def result_fields() -> tuple[ResultField, ...]:
    """Every head's result fields, in HEADS order."""
    return tuple(f for head in HEADS.values() for f in head.fields)


def fit_heads_on(data: FitData, names: list[str] | None = None, progress: bool = False) -> tuple[dict, dict, list]:
    """Fit the heads named (default: all, in HEADS order) on ``data``: their files (name -> bytes, for
    the bundle), their validation reports (head name -> report, for metrics.json) and what was fitted,
    one line or more per head."""
    from tqdm import tqdm

    files, reports, lines = {}, {}, []
    for name in tqdm(names or list(HEADS), desc="fitting heads", unit="head", disable=not progress):
        fitted = HEADS[name].from_training(data)
        if fitted.head is not None:
            files[HEADS[name].filename] = fitted.head.to_bytes()
        if fitted.report is not None:
            reports[name] = fitted.report
        lines += fitted.lines
    return files, reports, lines
