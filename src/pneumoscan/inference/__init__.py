"""Engines, the Classifier, inputs, results and their writers, Grad-CAM. Imports core to model."""
