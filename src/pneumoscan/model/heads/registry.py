"""The feature heads there are, declared once: :data:`HEADS`, in the order their result fields appear.

A head implements :class:`pneumoscan.model.heads.base.FeatureHead`. Everything else reads this table: the
bundle (which files it may hold and vouches for, ``Bundle.load_heads``), training and ``heads fit``
(:func:`pneumoscan.training.heads.fit_heads_on`), inference (``Classifier`` applies every head the bundle
has), the output record (``inference.result.FIELDS``, hence the service's fields and its page), evaluation
(each head's report) and ``heads fit --only``. Adding a head is its module and one entry here.
"""

from __future__ import annotations

from pneumoscan.model.heads.base import FeatureHead, ResultField
from pneumoscan.model.heads.gate import Gate
from pneumoscan.model.heads.subtype import SubtypeHead

HEADS: dict[str, type[FeatureHead]] = {head.name: head for head in (Gate, SubtypeHead)}


def head_files() -> tuple[str, ...]:
    """The heads' file names in a bundle, in HEADS order."""
    return tuple(head.filename for head in HEADS.values())


def result_fields() -> tuple[ResultField, ...]:
    """Every head's result fields, in HEADS order."""
    return tuple(f for head in HEADS.values() for f in head.fields)
