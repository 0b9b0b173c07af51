"""The two classes and the labelling rule, defined once for training, evaluation, prediction and reports."""

from __future__ import annotations

CLASSES = ("NORMAL", "PNEUMONIA")  # label 0 and label 1; PNEUMONIA is the positive class


def label_of(probability: float, threshold: float) -> str:
    """PNEUMONIA at or above the operating threshold, else NORMAL."""
    return CLASSES[1] if probability >= threshold else CLASSES[0]


SUBTYPES = ("bacterial", "viral")  # label 0 and 1 of the subtype head; viral is the positive class
