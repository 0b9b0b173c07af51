"""The Grad-CAM overlay people see (``pneumoscan predict --cam``, the demo, the service's ``cam``, the DICOM
node's Secondary Capture): the film shows through where the map is low, and the figure names the label and
probability and carries a colour bar."""

from __future__ import annotations

import numpy as np
import pytest

from pneumoscan import Classifier
from pneumoscan.cli.demo import EXAMPLES
from pneumoscan.inference.explain import CAM_CLEAR, CAM_OPAQUE, Explanation, cam_alpha

IMAGES = sorted(EXAMPLES.glob("*/*.jpeg"))


@pytest.fixture(scope="module")
def explained():
    clf = Classifier.load("default")
    return [clf.explain(path) for path in (IMAGES[0], IMAGES[-1])]  # a NORMAL and a PNEUMONIA example


def test_opacity_comes_from_the_map_value():
    values = np.linspace(0, 1, 101, dtype=np.float32)
    alpha = cam_alpha(values)
    assert np.all(alpha[values <= CAM_CLEAR] == 0) and alpha[-1] == pytest.approx(CAM_OPAQUE)
    assert np.all(np.diff(alpha) >= 0) and CAM_OPAQUE < 1  # rising with the map, the film never hidden


def test_the_film_shows_through_where_the_map_is_low(explained):
    for e in explained:
        blend = np.asarray(e.blend(), dtype=np.int16)
        film = np.repeat(e.image[..., None].astype(np.int16), 3, axis=2)
        low = e.heatmap <= CAM_CLEAR
        assert low.mean() > 0.1, "a map low over a tenth of the film at least"
        assert np.abs(blend[low] - film[low]).max() <= 1  # untinted grey, not a wash of blue
        high = e.heatmap >= 0.9
        assert high.any() and np.abs(blend[high] - film[high]).max() > 60  # and coloured where it is high


def test_the_overlay_names_label_and_probability_and_has_a_colour_bar(explained):
    for e in explained:
        figure = np.asarray(e.overlay())
        height, width = e.image.shape
        assert figure.shape[0] > height and figure.shape[1] > width
        band = figure.shape[0] - height
        assert np.array_equal(figure[band:, :width], np.asarray(e.blend()))  # nothing drawn over the film
        ink = figure[:band].reshape(-1, 3)
        colour = {"PNEUMONIA": (176, 32, 32), "NORMAL": (24, 96, 48)}[e.label]
        assert (np.abs(ink.astype(int) - colour).sum(axis=1) < 60).sum() > 50  # the label's words, in its colour
        side = figure[band:, width:].astype(int)
        reddish = (side[..., 0] > 150) & (side[..., 1] < 90) & (side[..., 2] < 90)
        coloured = side.max(axis=-1) - side.min(axis=-1) > 40
        assert reddish.sum() > 20 and (coloured & ~reddish).sum() > 20  # the colour bar: red at the peak, then on
    # the probability is written: another probability, another band; the film part the same
    e = explained[0]
    other = Explanation(e.heatmap, e.image, 1 - e.probability if abs(e.probability - 0.5) > 0.01 else 0.1, e.label)
    a, b = np.asarray(e.overlay()), np.asarray(other.overlay())
    band = a.shape[0] - e.image.shape[0]
    assert not np.array_equal(a[:band], b[:band]) and np.array_equal(a[band:], b[band:])
