"""The project's own error types: every failure a user can cause is one of these."""

from __future__ import annotations

from pathlib import Path


class PneumoscanError(Exception):
    """Base class: the CLI turns these into one line and an exit code."""


class ConfigError(PneumoscanError):
    """A usage or configuration problem (bad path, unknown backbone, unreadable model): exit 2."""


class ImageError(PneumoscanError):
    """One input could not be turned into an image; the rest of a batch goes on.

    ``kind``: ``"unsupported"`` (not an image format we read), ``"too_large"`` (over a size or
    pixel limit) or ``"invalid"`` (an image that cannot be used: empty, truncated, too small...)."""

    def __init__(self, source: str | Path, reason: str, kind: str = "invalid"):
        self.source = str(source)
        self.reason = reason
        self.kind = kind
        super().__init__(f"{self.source}: {reason}")
