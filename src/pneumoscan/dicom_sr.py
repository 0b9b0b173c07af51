"""Answers as DICOM: a Comprehensive SR (TID 1500 measurement report) per classified image, and the Grad-CAM
overlay as a Secondary Capture image, both in the source image's study.

The report references the source instance, carries the finding (NORMAL or PNEUMONIA as SNOMED CT codes), the
calibrated probability, the threshold and the rule that set it, the subtype where the bundle has the head, the
input gate's score and limit, the model's name, version and weights sha256 (TID 4019 algorithm identification),
and the words "research use only". An input the classifier refused gets a report that says so and why.

Built with highdicom. Codes without a standard equivalent (the probability, the threshold, the gate score) use
the private coding scheme ``99PNEUMOSCAN`` (docs/pacs.md lists them). UIDs are derived from the source instance
and the model's weights, so sending the same image twice gives the same SR (a PACS stores it once).
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from . import __version__
from .errors import ImageError
from .labels import CLASSES

RESEARCH_ONLY = "research use only: not a medical device, not for diagnosis"
MANUFACTURER = "pneumoscan"
SR_SERIES_NUMBER = 9901
CAM_SERIES_NUMBER = 9902
TYPE2_INHERITED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
)  # fmt: skip
SCHEME = "99PNEUMOSCAN"  # private coding scheme for concepts without a standard code


def _private(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value, SCHEME, meaning)


FINDING = hd.sr.CodedConcept("121071", "DCM", "Finding")
COMMENT = hd.sr.CodedConcept("121106", "DCM", "Comment")
CHEST_XRAY = hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")
LUNG = hd.sr.CodedConcept("39607008", "SCT", "Lung structure")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
FINDINGS = dict(
    zip(CLASSES, (hd.sr.CodedConcept("17621005", "SCT", "Normal"), hd.sr.CodedConcept("233604007", "SCT", "Pneumonia")))
)
SUBTYPES = {
    "bacterial": hd.sr.CodedConcept("53084003", "SCT", "Bacterial pneumonia"),
    "viral": hd.sr.CodedConcept("75570004", "SCT", "Viral pneumonia"),
}
REFUSED = _private("REFUSED", "Not classified: input refused")
SUBTYPE = _private("SUBTYPE", "Pneumonia subtype")
PROBABILITY = _private("PPNEU", "Probability of pneumonia")
THRESHOLD = _private("THRESH", "Decision threshold on the probability of pneumonia")
VIRAL_PROBABILITY = _private("PVIRAL", "Probability that the pneumonia is viral")
GATE_SCORE = _private("GATE", "Input gate score")
GATE_LIMIT = _private("GATELIM", "Input gate limit")


@dataclass(frozen=True)
class ModelInfo:
    """What the report says about the model that made the answer."""

    name: str
    version: str
    weights_sha256: str
    threshold_rule: str

    @classmethod
    def of(cls, bundle) -> ModelInfo:
        config = bundle.config
        return cls(
            name=bundle.name,
            version=str(config.get("version", "unversioned")),
            weights_sha256=config["weights_sha256"],
            threshold_rule=str(config.get("threshold_rule", "not recorded")),
        )


def read_header(data: bytes, name: str = "<dicom>") -> Dataset:
    """The header of a DICOM file (no pixel data read), with the UIDs a report needs, or :class:`ImageError`."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    except Exception as exc:  # noqa: BLE001 - any parser failure is this input's error
        raise ImageError(name, f"not a readable DICOM file ({str(exc)[:150]})", "unsupported") from None
    missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID") if not ds.get(k)]
    if missing:
        raise ImageError(name, f"DICOM header lacks {', '.join(missing)}", "unsupported")
    return ds


def _evidence(source: Dataset) -> Dataset:
    """A copy of the source header with the patient and study attributes a new instance must carry (type 2:
    present, possibly empty) that the source left out."""
    copy = Dataset(source)
    for keyword in TYPE2_INHERITED:
        if keyword not in copy:
            setattr(copy, keyword, "")
    return copy


def _uid(*parts: str) -> str:
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def sr_uids(source: Dataset, model: ModelInfo) -> tuple[str, str]:
    """(series, instance) UIDs of the report on ``source``: one SR series per source series and model."""
    series = _uid("pneumoscan-sr", source.SeriesInstanceUID, model.weights_sha256)
    return series, _uid("pneumoscan-sr", source.SOPInstanceUID, model.weights_sha256)


def _measurement(name: hd.sr.CodedConcept, value: float) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=float(value), unit=NO_UNITS)


def _comments(result, model: ModelInfo) -> list[str]:
    lines = [RESEARCH_ONLY.capitalize()]
    if result.ok:
        lines.append(
            f"Finding {result.label}: probability of pneumonia {result.probability:.4f}; PNEUMONIA when the "
            f"probability is at least the threshold {result.threshold:.4f} (threshold rule: {model.threshold_rule})"
        )
        if result.gate_score is not None and not result.gated:
            lines.append("Input gate off: labelled whether or not the image looks like a chest X-ray")
    else:
        lines.append(f"Refused, not classified: {result.error}")
    lines.append(f"Model {model.name} version {model.version}, weights sha256 {model.weights_sha256}")
    return lines


def build_report(source: Dataset, result, model: ModelInfo) -> hd.sr.ComprehensiveSR:
    """The SR for one source image's :class:`~pneumoscan.inference.Prediction` (a refusal included)."""
    measurements, evaluations = [], []
    if result.ok:
        evaluations.append(hd.sr.QualitativeEvaluation(FINDING, FINDINGS[result.label]))
        if result.subtype in SUBTYPES:
            evaluations.append(hd.sr.QualitativeEvaluation(SUBTYPE, SUBTYPES[result.subtype]))
        measurements += [_measurement(PROBABILITY, result.probability), _measurement(THRESHOLD, result.threshold)]
        if result.viral_probability is not None:
            measurements.append(_measurement(VIRAL_PROBABILITY, result.viral_probability))
    else:
        evaluations.append(hd.sr.QualitativeEvaluation(FINDING, REFUSED))
    if result.gate_score is not None:
        measurements += [_measurement(GATE_SCORE, result.gate_score), _measurement(GATE_LIMIT, result.gate_limit)]
    algorithm = hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        parameters=[f"weights sha256 {model.weights_sha256}", f"threshold rule {model.threshold_rule}"],
        manufacturer=MANUFACTURER,
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=_uid("pneumoscan-tracking", source.SOPInstanceUID), identifier="pneumoscan chest X-ray classification"
        ),
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(LUNG)],
        measurements=measurements or None,
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup(source.SOPClassUID, source.SOPInstanceUID)],
    )
    container = group[0]
    for text in _comments(result, model):
        container.ContentSequence.append(hd.sr.TextContentItem(COMMENT, text, relationship_type="CONTAINS"))
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_uid("pneumoscan-device", model.weights_sha256),
            name=model.name[:64],
            manufacturer_name=MANUFACTURER,
            model_name=f"{model.name} {model.version}"[:64],
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=CHEST_XRAY,
        imaging_measurements=[group],
    )
    series_uid, instance_uid = sr_uids(source, model)
    sr = hd.sr.ComprehensiveSR(
        evidence=[_evidence(source)],
        content=report[0],
        series_instance_uid=series_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=instance_uid,
        instance_number=_instance_number(source),
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        manufacturer_model_name=model.name[:64],
        software_versions=f"pneumoscan {__version__}",
        series_description="pneumoscan result (research use only)",
    )
    return sr


def _instance_number(source: Dataset) -> int:
    try:
        return max(1, int(source.get("InstanceNumber") or 1))
    except (TypeError, ValueError):
        return 1


def build_cam_image(source: Dataset, overlay: np.ndarray, model: ModelInfo) -> Dataset:
    """The Grad-CAM overlay (uint8 RGB array) as a Secondary Capture image in a new series of the source's study."""
    series = _uid("pneumoscan-cam", source.SeriesInstanceUID, model.weights_sha256)
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=_evidence(source),
        pixel_array=np.ascontiguousarray(overlay, dtype=np.uint8),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system="PATIENT",
        patient_orientation=("L", "F"),  # required by the builder; replaced below by what the source says
        series_instance_uid=series,
        series_number=CAM_SERIES_NUMBER,
        sop_instance_uid=_uid("pneumoscan-cam", source.SOPInstanceUID, model.weights_sha256),
        instance_number=_instance_number(source),
        manufacturer=MANUFACTURER,
        series_description="pneumoscan Grad-CAM (research use only)",
    )
    orientation = source.get("PatientOrientation")
    image.PatientOrientation = list(orientation) if orientation and len(orientation) == 2 else ""  # type 2: unknown
    image.ImageComments = f"Grad-CAM of the predicted class; {RESEARCH_ONLY}"
    image.BurnedInAnnotation = "NO"
    return image


def finding_of(sr: Dataset) -> str | None:
    """The finding an SR written here states (``NORMAL``, ``PNEUMONIA`` or ``REFUSED``), read back from its content."""
    meaning = {c.value: label for label, c in FINDINGS.items()} | {REFUSED.value: "REFUSED"}
    stack = list(sr.get("ContentSequence", []))
    while stack:
        item = stack.pop()
        name = item.get("ConceptNameCodeSequence")
        if item.get("ValueType") == "CODE" and name and name[0].CodeValue == FINDING.value:
            return meaning.get(item.ConceptCodeSequence[0].CodeValue)
        stack += list(item.get("ContentSequence", []))
    return None


def write_reports(results, folder: Path, model: ModelInfo) -> list[Path]:
    """``predict --sr``: one SR file per DICOM input (``SR_INSTANCE_UID.dcm``), refusals included; an input
    that is not DICOM, or whose header lacks the UIDs, is named on stderr and the rest go on."""
    from .images import read_bytes, sniff
    from .output import ensure_folder
    from .text import printable

    folder = ensure_folder(folder)
    written = []
    for r in results:
        try:
            data = read_bytes(r.path, r.path)
            if sniff(data, r.path) != "dicom":
                raise ImageError(r.path, "not a DICOM file: no structured report")
            report = build_report(read_header(data, r.path), r, model)
            path = folder / f"{report.SOPInstanceUID}.dcm"
            report.save_as(path, enforce_file_format=True)
            written.append(path)
        except ImageError as exc:
            print(f"pneumoscan: {printable(exc)}", file=sys.stderr)
        except OSError as exc:
            print(f"pneumoscan: {printable(folder)}: report cannot be written ({exc.strerror or exc})", file=sys.stderr)
    return written
