"""Fuzzing the one image loader: whatever the bytes, only ImageError escapes, quickly.

Bounded for the suite (a few hundred examples, a deadline per example catches hangs); run longer with
``HYPOTHESIS_PROFILE=long python -m pytest tests/test_fuzz.py``."""

import os

import numpy as np
from corpus import REAL, dicom, encode, png16, real_grey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pneumoscan.core.errors import ImageError
from pneumoscan.io.images import load_image, prepare

settings.register_profile("suite", max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=20000, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))

_GREY = real_grey()[::2, ::2]
SEEDS = {
    "jpeg": REAL.read_bytes(),
    "png16": png16(_GREY),
    "dicom": dicom(_GREY),
    "png": encode(__import__("PIL.Image", fromlist=["Image"]).fromarray(_GREY), "PNG"),
}


def _load_or_refuse(data: bytes) -> None:
    try:
        out = prepare(data, 64)
    except ImageError as exc:
        assert exc.reason and "\n" not in str(exc)
        return
    assert out.shape == (64, 64) and out.dtype == np.uint8


@given(st.binary(max_size=2048))
def test_arbitrary_bytes(data):
    _load_or_refuse(data)


@given(
    st.sampled_from(sorted(SEEDS)),
    st.lists(st.tuples(st.integers(0, 10**7), st.integers(0, 255)), min_size=1, max_size=12),
    st.integers(0, 10**7),
)
def test_mutated_real_files(kind, flips, cut):
    data = bytearray(SEEDS[kind])
    for position, value in flips:
        data[position % len(data)] = value
    _load_or_refuse(bytes(data[: max(1, cut % (len(data) + 1))]))


def test_fuzz_targets_are_valid_before_mutation():
    for data in SEEDS.values():
        assert load_image(data).mode == "L"
