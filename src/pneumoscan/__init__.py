"""pneumoscan: pneumonia detection on chest X-rays.

>>> from pneumoscan import Classifier
>>> clf = Classifier.load()  # the bundled default model
>>> clf.predict(["chest.jpeg"])
"""

from pneumoscan.core.errors import ConfigError, ImageError, PneumoscanError
from pneumoscan.core.package import __version__
from pneumoscan.inference.classifier import Classifier
from pneumoscan.inference.result import Prediction

__all__ = ["Classifier", "Prediction", "PneumoscanError", "ConfigError", "ImageError", "__version__"]
