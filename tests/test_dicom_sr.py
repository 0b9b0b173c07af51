"""The structured report, checked against highdicom: the same document as highdicom's TID 1500 builder makes
(kept here as the reference), and read back by highdicom as a measurement report with the right finding."""

from __future__ import annotations

import io
import warnings

import highdicom as hd
import pydicom
import pytest
from conftest import DATA
from pacs import bomb_dicom, chest_dicom
from pydicom.sr.codedict import codes

from pneumoscan.core.errors import ImageError
from pneumoscan.inference.result import Prediction
from pneumoscan.io import dicom_sr
from pneumoscan.io.dicom_sr import ModelInfo, build_cam_image, build_report, finding_of, read_header

FILM = DATA / "fullres_sample" / "PNEUMONIA" / "person1411_bacteria_3593.jpeg"
MODEL = ModelInfo("pneumoscan-test-model", "2026.12.01", "ab" * 32, "balanced")
RESULTS = {
    "PNEUMONIA": Prediction("a", 0.93, "PNEUMONIA", 0.5, None, 2.1, 4.9, True, "viral", 0.81),
    "NORMAL": Prediction("b", 0.04, "NORMAL", 0.5, None, 1.7, 4.9, True),
    "REFUSED": Prediction("c", error="not a chest X-ray: input gate score 9.1 is over its limit 4.9", gate_score=9.1,
                          gate_limit=4.9),
}  # fmt: skip


@pytest.fixture(scope="module")
def source():
    return read_header(chest_dicom(FILM))


def highdicom_report(source, result, model: ModelInfo) -> hd.sr.ComprehensiveSR:
    """The reference: the same report built with highdicom's TID 1500 classes."""
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=dicom_sr.tracking_uid(source), identifier=dicom_sr.TRACKING_TEXT
        ),
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=model.name,
            version=model.version,
            parameters=[f"weights sha256 {model.weights_sha256}", f"threshold rule {model.threshold_rule}"],
            manufacturer=dicom_sr.MANUFACTURER,
        ),
        finding_type=dicom_sr.finding(result),
        finding_sites=[hd.sr.FindingSite(dicom_sr.LUNG)],
        measurements=[
            hd.sr.Measurement(name=name, value=value, unit=dicom_sr.NO_UNITS)
            for name, value in dicom_sr.measurements(result)
        ]
        or None,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(n, v) for n, v in dicom_sr.evaluations(result)] or None,
        source_images=[hd.sr.SourceImageForMeasurementGroup(source.SOPClassUID, source.SOPInstanceUID)],
    )
    for line in dicom_sr.comments(result, model):
        group[0].ContentSequence.append(hd.sr.TextContentItem(dicom_sr.COMMENT, line, relationship_type="CONTAINS"))
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=dicom_sr.device_uid(model),
            name=model.name,
            manufacturer_name=dicom_sr.MANUFACTURER,
            model_name=f"{model.name} {model.version}",
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=dicom_sr.CHEST_XRAY,
        imaging_measurements=[group],
    )
    series, instance = dicom_sr.sr_uids(source, model)
    return hd.sr.ComprehensiveSR(
        evidence=[source],
        content=report[0],
        series_instance_uid=series,
        series_number=dicom_sr.SR_SERIES_NUMBER,
        sop_instance_uid=instance,
        instance_number=1,
        manufacturer=dicom_sr.MANUFACTURER,
        is_complete=True,
    )


@pytest.mark.data
@pytest.mark.parametrize("case", sorted(RESULTS))
def test_report_is_the_document_highdicom_builds(source, case):
    ours, reference = build_report(source, RESULTS[case], MODEL), highdicom_report(source, RESULTS[case], MODEL)
    assert ours.ContentSequence == reference.ContentSequence
    assert ours.CurrentRequestedProcedureEvidenceSequence == reference.CurrentRequestedProcedureEvidenceSequence
    same = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "PatientID", "PatientName",
            "ContentTemplateSequence", "ConceptNameCodeSequence", "CompletionFlag", "VerificationFlag",
            "Modality")  # fmt: skip
    for keyword in same:
        assert ours.get(keyword) == reference.get(keyword), keyword


@pytest.mark.data
@pytest.mark.parametrize("case", sorted(RESULTS))
def test_highdicom_reads_the_report_back_with_its_finding(source, case):
    buffer = io.BytesIO()
    build_report(source, RESULTS[case], MODEL).save_as(buffer, enforce_file_format=True)
    sr = hd.sr.ComprehensiveSR.from_dataset(pydicom.dcmread(io.BytesIO(buffer.getvalue())))
    assert finding_of(sr) == case
    (group,) = sr.content.get_image_measurement_groups()
    assert group.tracking_uid == dicom_sr.tracking_uid(source) and group.finding_sites[0].value == dicom_sr.LUNG
    (observer,) = sr.content.get_observer_contexts()
    assert observer.observer_identifying_attributes.name == MODEL.name
    assert group.source_images[0].referenced_sop_instance_uid == source.SOPInstanceUID
    values = {m.name.value: m.value for m in group.get_measurements()}
    result = RESULTS[case]
    assert values.get("GATE") == pytest.approx(result.gate_score)
    assert values.get("PPNEU") == (None if not result.ok else pytest.approx(result.probability))
    items = group[0].ContentSequence
    texts = [item.TextValue for item in items if item.ValueType == "TEXT" and item.name.value == "121106"]
    assert texts[0].lower().startswith("research use only")
    assert ("Refused" in texts[1]) == (case == "REFUSED")
    if case == "PNEUMONIA":
        evaluation = {e.name.value: e.value.meaning for e in group.get_qualitative_evaluations()}
        assert group.finding_type.meaning == "Pneumonia" and evaluation == {"SUBTYPE": "Viral pneumonia"}


@pytest.mark.data
def test_report_uids_are_stable_per_source_and_model(source):
    first, again = build_report(source, RESULTS["NORMAL"], MODEL), build_report(source, RESULTS["NORMAL"], MODEL)
    other = build_report(source, RESULTS["NORMAL"], ModelInfo("m", "1", "cd" * 32, "youden"))
    assert first.SOPInstanceUID == again.SOPInstanceUID != other.SOPInstanceUID
    assert first.SOPInstanceUID != source.SOPInstanceUID and first.StudyInstanceUID == source.StudyInstanceUID


@pytest.mark.data
def test_secondary_capture_keeps_the_study_and_the_pixels(source):
    import numpy as np

    overlay = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    sc = build_cam_image(source, overlay, MODEL)
    buffer = io.BytesIO()
    sc.save_as(buffer, enforce_file_format=True)
    back = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    assert back.StudyInstanceUID == source.StudyInstanceUID and back.SeriesInstanceUID != source.SeriesInstanceUID
    assert np.array_equal(back.pixel_array, overlay)
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_a_header_without_valid_uids_is_a_clear_error():
    ds = pydicom.dcmread(io.BytesIO(bomb_dicom()))
    del ds.StudyInstanceUID
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with pytest.raises(ImageError, match="lacks StudyInstanceUID"):
        read_header(buffer.getvalue(), "x.dcm")
    with warnings.catch_warnings():  # pydicom warns about the invalid UI value, written and read on purpose
        warnings.simplefilter("ignore")
        ds.StudyInstanceUID = "1.2.3.<script>"
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        with pytest.raises(ImageError, match="invalid StudyInstanceUID"):
            read_header(buffer.getvalue(), "z.dcm")
    with pytest.raises(ImageError, match="y.dcm: DICOM header lacks"):
        read_header(b"\0" * 10, "y.dcm")
