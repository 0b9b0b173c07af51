"""calibrate refuses a set whose labels carry no signal or run backwards: a temperature and threshold fitted
there would call every film one class."""

import shutil

import pytest
from conftest import real_images

from pneumoscan.cli.main import main
from pneumoscan.core.errors import ConfigError
from pneumoscan.training.calibrate import calibrate_bundle

pytestmark = pytest.mark.data


def _labelled(root, normal, pneumonia):
    for label, films in (("NORMAL", normal), ("PNEUMONIA", pneumonia)):
        (root / label).mkdir(parents=True)
        for film in films:
            shutil.copy(film, root / label / film.name)
    return root


@pytest.fixture(scope="module")
def films():
    return real_images("train", "NORMAL", 12, offset=3), real_images("train", "PNEUMONIA", 12, offset=3)


def test_swapped_class_folders_are_refused(films, tmp_path, capsys):
    normal, pneumonia = films
    swapped = _labelled(tmp_path / "swapped", pneumonia, normal)
    with pytest.raises(ConfigError, match="below chance: are the NORMAL and PNEUMONIA folders swapped"):
        calibrate_bundle(swapped, tmp_path / "m", n_resamples=20, progress=False)
    assert main(["calibrate", "--data", str(swapped), "--out", str(tmp_path / "m"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(swapped) in err[0] and "refused" in err[0] and not (tmp_path / "m").exists()


def test_the_same_films_in_both_classes_are_refused(films, tmp_path):
    normal, pneumonia = films
    same = _labelled(tmp_path / "same", normal[:6] + pneumonia[:6], normal[:6] + pneumonia[:6])
    with pytest.raises(ConfigError, match=r"AUC on these labels is 0\.500.*not above chance"):
        calibrate_bundle(same, tmp_path / "m", n_resamples=20, progress=False)


def test_a_few_mislabelled_films_still_calibrate(films, tmp_path):
    """Signal with some noise is a real site: two films of each class in the wrong folder still calibrate."""
    normal, pneumonia = films
    noisy = _labelled(tmp_path / "noisy", normal[2:] + pneumonia[:2], pneumonia[2:] + normal[:2])
    bundle, report = calibrate_bundle(noisy, tmp_path / "m", n_resamples=20, progress=False)
    assert 0.5 < report["auc"] < 1 and 0 < bundle.threshold < 1
