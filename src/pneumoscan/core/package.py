"""The installed package: its version and the folder its bundled files (models, examples) live in."""

from pathlib import Path

__version__ = "0.1.0"
PACKAGE = Path(__file__).resolve().parents[1]  # src/pneumoscan: default_model/, examples/
