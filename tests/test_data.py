import os
import shutil
import unittest.mock

import pytest
from conftest import D224, link_dataset, real_images

from pneumoscan.core.errors import ConfigError
from pneumoscan.io.dataset import (
    check_dataset,
    load_split,
    patient_id,
    split_by_patient,
    stratified_subset,
    training_splits,
)


@pytest.mark.parametrize(
    "name,patient",
    [
        ("person1000_bacteria_2931.jpeg", "person1000"),
        ("person1000_virus_1681.jpeg", "person1000"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("NORMAL2-IM-0051-0001.jpeg", "NORMAL2-IM-0051"),
        ("scan_17.png", "scan_17"),
    ],
)
def test_patient_ids(name, patient):
    assert patient_id(name) == patient


@pytest.mark.data
def test_real_train_split_by_patient_has_no_leak_and_keeps_class_balance():
    samples = load_split(D224, "train")
    assert len(samples) == 5216
    train, val = split_by_patient(samples, 0.1, seed=3)
    assert not {s.patient for s in train} & {s.patient for s in val}
    assert len(train) + len(val) == len(samples)
    for label in (0, 1):
        patients = {s.patient for s in samples if s.label == label}
        held = {s.patient for s in val if s.label == label}
        assert abs(len(held) / len(patients) - 0.1) < 0.01
    again = split_by_patient(samples, 0.1, seed=3)[1]
    assert [s.path for s in again] == [s.path for s in val]
    assert [s.path for s in split_by_patient(samples, 0.1, seed=4)[1]] != [s.path for s in val]


@pytest.mark.data
def test_official_val_source_keeps_the_16_images():
    train, val = training_splits(D224, "official")
    assert len(val) == 16 and len(train) == 5216


@pytest.mark.data
def test_flat_layout_and_errors(tmp_path):
    flat = tmp_path / "flat"
    for label in ("NORMAL", "PNEUMONIA"):
        (flat / label).mkdir(parents=True)
        for f in real_images("test", label, 3):
            os.symlink(f, flat / label / f.name)
    assert len(load_split(flat)) == 6
    assert len(load_split(flat, "test")) == 6  # a flat folder serves any split name
    with pytest.raises(ConfigError, match="not found"):
        load_split(tmp_path / "nope", "train")
    (tmp_path / "empty" / "NORMAL").mkdir(parents=True)
    (tmp_path / "empty" / "PNEUMONIA").mkdir()
    with pytest.raises(ConfigError, match="no images"):
        load_split(tmp_path / "empty")
    with pytest.raises(ConfigError, match="class folders"):
        load_split(tmp_path)


@pytest.mark.data
def test_stratified_subset():
    samples = load_split(D224, "test")
    sub = stratified_subset(samples, 10, seed=0)
    assert sum(s.label for s in sub) == 10 and len(sub) == 20


@pytest.mark.data
def test_data_check_finds_unreadable_duplicates_and_crossing_patients(tmp_path):
    root = link_dataset(tmp_path / "d", {"train": 5, "test": 5})
    (root / "train" / "NORMAL" / "broken.jpeg").write_bytes(b"not a jpeg")
    pneumonia = sorted((root / "train" / "PNEUMONIA").iterdir())[0]
    os.symlink(os.readlink(pneumonia), root / "test" / "PNEUMONIA" / "person99999_virus_1.jpeg")
    os.symlink(os.readlink(pneumonia), root / "test" / "PNEUMONIA" / pneumonia.name)
    report = check_dataset(root, progress=False)
    assert report.counts["train"] == {"NORMAL": 6, "PNEUMONIA": 5}
    assert len(report.unreadable) == 1 and "broken.jpeg" in report.unreadable[0]
    assert any(len(g) == 3 for g in report.duplicate_groups)
    assert pneumonia.name.split("_")[0] in report.crossing_patients
    text = "\n".join(report.lines())
    assert "unreadable files: 1" in text and "across splits" in text


@pytest.mark.data
def test_acquisition_jitter_changes_real_xrays_within_bounds_and_is_seeded():
    import numpy as np
    import torch

    from pneumoscan.io.images import prepare
    from pneumoscan.training.augment import AcquisitionJitter, Augmentation

    image = torch.from_numpy(prepare(real_images("train", "NORMAL", 1)[0], 224))[None]
    jitter = AcquisitionJitter(1.0)
    for kind in jitter.KINDS:
        for u in (0.0, 1.0):
            out = getattr(jitter, "_" + kind)(image, u)
            assert out.dtype == torch.uint8 and out.shape == image.shape, kind
            change = (out.float() - image.float()).abs().mean()
            assert 0.2 < change < 60, (kind, u, float(change))
    assert AcquisitionJitter(0.0)(image) is image

    def augmented(seed):
        torch.manual_seed(seed)
        aug = Augmentation(acquisition=1.0).build()
        return np.stack([aug(image).numpy() for _ in range(8)])

    assert np.array_equal(augmented(0), augmented(0)) and not np.array_equal(augmented(0), augmented(1))


@pytest.mark.data
def test_data_check_explains_crossing_patients_and_names_real_leaks(tmp_path, capsys):
    """A patient number in two splits is explained (Kermany restarts its numbers per split); the same film in
    two splits, byte-identical or re-encoded, is called a leak."""
    from PIL import Image

    from pneumoscan.cli.main import main

    films = (
        sorted((D224 / "train" / "PNEUMONIA").glob("*.jpeg"))[:2] + sorted((D224 / "train" / "NORMAL").glob("*"))[:2]
    )
    for split in ("train", "test"):
        for label in ("NORMAL", "PNEUMONIA"):
            (tmp_path / split / label).mkdir(parents=True)
    shutil.copyfile(films[0], tmp_path / "train" / "PNEUMONIA" / "person1_bacteria_1.jpeg")
    shutil.copyfile(films[1], tmp_path / "test" / "PNEUMONIA" / "person1_virus_7.jpeg")  # another film
    shutil.copyfile(films[2], tmp_path / "train" / "NORMAL" / "IM-0001-0001.jpeg")
    shutil.copyfile(films[3], tmp_path / "test" / "NORMAL" / "IM-0002-0001.jpeg")
    assert main(["data", "check", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "patients in more than one split: 1" in out
    assert "person1 of test is not person1 of train: expected there" in out and "which leaks" in out
    assert "none of them has the same image" in out and "leak:" not in out
    with Image.open(films[0]) as film:  # the train film again, re-encoded and smaller: not byte-identical
        film.resize((200, 200)).save(tmp_path / "test" / "PNEUMONIA" / "person1_bacteria_2.jpeg", quality=70)
    assert main(["data", "check", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "near-identical images across splits (same picture, other bytes): 1 (a leak" in out
    assert "leak: 1 of them have the same image in two splits" in out and "person1" in out.split("leak:")[1]


def test_aspect_jitter_rescales_width_against_height_and_is_off_by_default():
    """A real film's lung content stretched across and squeezed down by the factor drawn; recorded recipes
    (no "aspect" entry) keep it off."""
    import numpy as np
    import torch

    from pneumoscan.io.images import prepare
    from pneumoscan.training.augment import AspectJitter, Augmentation
    from pneumoscan.training.recipe import TrainConfig

    square = np.zeros((1, 224, 224), np.uint8)
    square[0, 72:152, 72:152] = 200  # an 80 x 80 block
    for factor in (0.7, 1.4):
        out = AspectJitter.rescaled(torch.from_numpy(square), factor)[0].numpy() > 100
        width, height = out.any(0).sum(), out.any(1).sum()
        assert abs(width / height - factor) < 0.05, (factor, width, height)
        assert abs(width * height - 80 * 80) < 0.06 * 80 * 80  # area kept
    film = torch.from_numpy(prepare(real_images("train", "PNEUMONIA", 1)[0], 224))[None]
    torch.manual_seed(0)
    jitter = AspectJitter(0.4)
    drawn = [jitter(film) for _ in range(4)]
    assert all(d.shape == film.shape and d.dtype == torch.uint8 for d in drawn)
    assert not any(torch.equal(d, film) for d in drawn)
    assert Augmentation().aspect == 0
    assert not any(isinstance(s, AspectJitter) for s in Augmentation().build().transforms)
    assert any(isinstance(s, AspectJitter) for s in Augmentation(aspect=0.4).build().transforms)
    assert TrainConfig.from_recipe("shipped").augmentation.aspect == 0
    assert "aspect" not in TrainConfig.from_recipe("shipped").recorded()["augmentation"]  # as recorded before it
    assert TrainConfig.from_recipe("default", augmentation={"aspect": 0.4}).recorded()["augmentation"]["aspect"] == 0.4


def test_a_class_subfolder_that_cannot_be_listed_is_refused_not_skipped(tmp_path):
    """Evaluation, calibration, training and data check all list through load_split: a folder it cannot list
    would drop its images from every count without a word, so it is refused, named, with the reason."""
    for label in ("NORMAL", "PNEUMONIA"):
        (tmp_path / label).mkdir()
        shutil.copy(real_images("train", label, 1)[0], tmp_path / label)
    os.symlink("knot", tmp_path / "PNEUMONIA" / "knot")  # a folder link to itself: it cannot be listed
    (tmp_path / "PNEUMONIA" / "more").mkdir()
    os.symlink(tmp_path / "PNEUMONIA" / "more" / "loop", tmp_path / "PNEUMONIA" / "more" / "loop")
    assert len(load_split(tmp_path)) == 2  # links are not followed: nothing is missing
    real = os.scandir

    def refuse_more(path):
        if str(path).endswith("more"):
            raise PermissionError(13, "Permission denied")
        return real(path)

    with unittest.mock.patch("os.scandir", refuse_more), pytest.raises(ConfigError, match="more: folder cannot be"):
        load_split(tmp_path)
