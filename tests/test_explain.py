"""Grad-CAM without autograd (ONNX feature map, closed-form head gradient, numpy) against PyTorch's
autograd Grad-CAM of the same bundle, on real X-rays: the bundled examples and full-resolution films."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pneumoscan import Classifier
from pneumoscan.cli.demo import EXAMPLES
from pneumoscan.inference.explain import ClosedFormError, class_activation_map, grad_cam_map
from pneumoscan.io.images import prepare
from pneumoscan.model.schema import ONNX_FEATURE_MAP, ONNX_FEATURES, ONNX_INPUT, ONNX_OUTPUT

IMAGES = sorted(EXAMPLES.glob("*/*.jpeg"))


@pytest.fixture(scope="module")
def onnx_clf():
    # the bundled default model's fp32 ONNX model, the one Grad-CAM reads its feature map from (an int8
    # model's is quantised); an ensemble's explanations: tests/test_ensemble.py
    return Classifier.load("default", fp32=True)


@pytest.fixture(scope="module")
def net(onnx_clf):
    return onnx_clf.bundle.load_net()


def _onnx_outputs(clf, path):
    x = prepare(path, clf.image_size)
    names = [ONNX_OUTPUT, ONNX_FEATURES, ONNX_FEATURE_MAP]
    logit, features, feature_map = clf.engine.session.run(names, {ONNX_INPUT: x[None, None]})
    return x, float(logit[0]), features[0], feature_map[0]


def test_the_bundled_onnx_model_gives_the_feature_map(onnx_clf):
    assert onnx_clf.engine.name == "onnx" and onnx_clf.engine.has_feature_map
    _, _, features, feature_map = _onnx_outputs(onnx_clf, IMAGES[0])
    assert feature_map.shape == (1280, 7, 7) and features.shape == (1280,)
    assert np.allclose(feature_map.mean(axis=(1, 2)), features, rtol=1e-4, atol=1e-5)  # pooling is the mean


@pytest.mark.parametrize("path", IMAGES, ids=[p.name for p in IMAGES])
def test_maps_match_autograd_grad_cam(onnx_clf, net, path):
    head = onnx_clf.bundle.head_weights()
    x, onnx_logit, features, feature_map = _onnx_outputs(onnx_clf, path)
    for positive in (True, False):
        ours, head_logit = grad_cam_map(feature_map, features, head, positive)
        reference, torch_logit = class_activation_map(net, torch.from_numpy(x)[None, None], positive)
        assert head_logit == pytest.approx(onnx_logit, abs=1e-3) and head_logit == pytest.approx(torch_logit, abs=1e-3)
        assert np.abs(ours - reference).max() < 1e-3
        if reference.std() > 0:  # both are all zero where no position favours the class
            assert np.corrcoef(ours.ravel(), reference.ravel())[0, 1] > 0.9999


@pytest.mark.data
def test_explanations_match_on_full_resolution_films(onnx_clf):
    """The whole path (decode, map, resize to the film) on ONNX and on the PyTorch engine."""
    from conftest import VAL_FULLRES

    films = sorted(VAL_FULLRES.rglob("*.jpeg"))[:2]
    assert len(films) == 2
    autograd = Classifier.load("default", engine="torch")
    for film in films:
        ours, reference = onnx_clf.explain(film), autograd.explain(film)
        assert ours.label == reference.label and ours.probability == pytest.approx(reference.probability, abs=1e-4)
        assert ours.heatmap.shape == reference.heatmap.shape and np.abs(ours.heatmap - reference.heatmap).max() < 2e-3
    assert onnx_clf._torch_net is None and autograd._torch_net is not None


def test_the_closed_form_refuses_features_that_are_not_the_mean(onnx_clf):
    head = onnx_clf.bundle.head_weights()
    _, _, features, feature_map = _onnx_outputs(onnx_clf, IMAGES[0])
    with pytest.raises(ClosedFormError, match="not the mean"):
        grad_cam_map(feature_map, features * 1.5 + 0.1, head, True)  # a class token or a norm after pooling
