"""pneumoscan: pneumonia detection on chest X-rays.

>>> from pneumoscan import Classifier
>>> clf = Classifier.load()  # the bundled default model
>>> clf.predict(["chest.jpeg"])
"""

__version__ = "0.1.0"

from .errors import ConfigError, ImageError, PneumoscanError  # noqa: E402
from .inference import Classifier, Prediction  # noqa: E402

__all__ = ["Classifier", "Prediction", "PneumoscanError", "ConfigError", "ImageError", "__version__"]
