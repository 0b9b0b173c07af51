"""The project's own error types: every failure a user can cause is one of these."""

from __future__ import annotations

from pathlib import Path


class PneumoscanError(Exception):
    """Base class: the CLI turns these into one line and an exit code."""


class ConfigError(PneumoscanError):
    """A usage or configuration problem (bad path, unknown backbone, unreadable model): exit 2."""


# The one definition of what each kind of image failure is, and the HTTP status it gets.
IMAGE_ERROR_STATUS = {
    "unsupported": 415,  # not a format we read: neither JPEG, PNG nor DICOM by its content
    "too_large": 413,  # over a size, pixel or decoding-memory limit
    "invalid": 422,  # a JPEG, PNG or DICOM that cannot be used: empty, truncated, too small, undecodable
}


class ImageError(PneumoscanError):
    """One input could not be turned into an image; the rest of a batch goes on.

    ``kind``: ``"unsupported"`` (not an image format we read), ``"too_large"`` (over a size or
    pixel limit) or ``"invalid"`` (an image that cannot be used: empty, truncated, too small, a DICOM
    file whose pixel data cannot be decoded...); :data:`IMAGE_ERROR_STATUS` maps each to its HTTP status."""

    def __init__(self, source: str | Path, reason: str, kind: str = "invalid"):
        self.source = str(source)
        self.reason = reason
        self.kind = kind
        super().__init__(f"{self.source}: {reason}")

    @property
    def http_status(self) -> int:
        return IMAGE_ERROR_STATUS.get(self.kind, 422)


TRAIN_EXTRA = 'pip install "pneumoscan[train]"'
TRAINING_STACK = ("torch", "torchvision", "timm", "lightning", "torchmetrics")  # what the train extra installs


def require_train_extra(what: str, modules: tuple[str, ...] = ("torch",)) -> None:
    """Raise a one-line :class:`ConfigError` saying that ``what`` needs the ``train`` extra, where any of
    ``modules`` cannot be imported. The base install (prediction, evaluation, calibration, the service)
    runs on ONNX Runtime and numpy alone; training, export and PyTorch inference need PyTorch."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise ConfigError(f"{what} needs PyTorch ({name} is not installed): {TRAIN_EXTRA}") from None
