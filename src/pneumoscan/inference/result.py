"""One input's result (:class:`Prediction`) and the fields of its record, in the order every writer uses."""

from __future__ import annotations

from dataclasses import dataclass, field

from pneumoscan.model.heads.base import ResultField
from pneumoscan.model.heads.registry import result_fields


@dataclass
class Prediction:
    path: str
    probability: float | None = None
    label: str | None = None
    threshold: float | None = None
    error: str | None = None
    gate_score: float | None = None  # the input gate's score, where the bundle has a gate (over the limit: refused)
    gate_limit: float | None = None
    gated: bool = True  # False: predicted with the gate off (--no-gate, gate=False)
    subtype: str | None = None  # "bacterial" or "viral", for PNEUMONIA where the bundle has the head
    viral_probability: float | None = None
    warnings: list[str] = field(default_factory=list)  # a degraded film: what the input gate noticed
    extra: dict = field(default_factory=dict)  # result fields of feature heads that have no attribute above

    @property
    def ok(self) -> bool:
        return self.error is None

    def get(self, name: str):
        """The value of record field ``name`` (:data:`output.FIELDS`), or None where the result has none;
        ``gate`` is "off" for a result predicted with the gate off."""
        if name == "gate":
            return "off" if self.gate_score is not None and not self.gated else None
        if name in _ATTRIBUTES:
            return getattr(self, name)
        return self.extra.get(name)

    def set(self, name: str, value) -> None:
        """Set record field ``name`` (a feature head's result field)."""
        if name == "gate":
            self.gated = value != "off"
        elif name in _ATTRIBUTES:
            setattr(self, name, value)
        else:
            self.extra[name] = value

    def to_dict(self) -> dict:
        """The fields this result has, as JSON lines and the service write them (:func:`output.record`)."""

        return record(self)


_ATTRIBUTES = {f for f in Prediction.__dataclass_fields__ if f != "extra"}


# The prediction record, declared once: its fields in order, how people read each (the service's page
# shows a result's fields under these names) and the decimals a number is written with. The feature heads
# (feature_heads.HEADS) declare theirs, between the pneumonia head's and the warnings. JSON lines (and the
# service's responses) hold the fields a result has (:func:`record`); CSV, an evaluation's predictions.csv
# and the table hold the columns below, from the same record.
RECORD = (
    ResultField("path", "file"),
    ResultField("probability", "probability of pneumonia", 6),
    ResultField("label", "label"),
    ResultField("threshold", "threshold", 6),
    ResultField("error", "error"),
    *result_fields(),
    ResultField("warnings", "warnings"),  # a degraded film: what the input gate noticed
)


FIELDS = tuple(f.name for f in RECORD)


DIGITS = {f.name: f.digits for f in RECORD if f.digits is not None}


LABELS = {f.name: f.label for f in RECORD}


CSV_COLUMNS = tuple(f.name for f in RECORD if f.csv)  # e.g. not the gate's limit: the bundle's, on every row


def record(result) -> dict:
    """One result (:class:`inference.Prediction`) as the fields it has, in the declared order: path and
    error, or path, probability, label and threshold; then each feature head's fields where it gave them
    (gate score and limit where the bundle has a gate, ``"gate": "off"`` when it was not applied; subtype
    and viral probability for PNEUMONIA where the bundle has the head), and the warnings, if any."""
    out = {}
    for name in FIELDS:
        value = result.get(name)
        if value is not None and not (isinstance(value, list) and not value):
            out[name] = list(value) if isinstance(value, list) else value
    return out


def field_list() -> list[dict]:
    """The record's fields in order, each with the name people read and its decimals (None: not a number
    written with fixed decimals): what the service's page renders a result from."""
    return [{"name": n, "label": LABELS.get(n, n.replace("_", " ")), "digits": DIGITS.get(n)} for n in FIELDS]
