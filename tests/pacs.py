"""The clinical side of the DICOM tests: a real Orthanc PACS on loopback ports, and real chest X-rays as DICOM."""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
STORESCU = shutil.which("storescu") or "/usr/bin/storescu"
ECHOSCU = shutil.which("echoscu") or "/usr/bin/echoscu"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")  # Debian's orthanc-dicomweb


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def orthanc_config(
    folder: Path, http_port: int, dicom_port: int, modalities: dict[str, list], dicomweb: bool = False
) -> dict:
    """The configuration the tests (and docs/pacs.md) use: loopback only, its own storage, no plugins (or only
    the DICOMweb one, serving STOW-RS at /dicom-web/)."""
    extra = {"Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}} if dicomweb else {}
    return {
        "Name": "pneumoscan-test-pacs",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [],
        "DicomModalities": modalities,
        "DicomScuTimeout": 30,
        "SaveJobs": False,
        "StorageCompression": False,
        **extra,
    }


class Orthanc:
    """An Orthanc process with its own configuration, spoken to over its REST API."""

    def __init__(self, folder: Path, modalities: dict[str, list], dicomweb: bool = False):
        self.http_port, self.dicom_port = free_port(), free_port()
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "orthanc.json"
        config.write_text(
            json.dumps(orthanc_config(folder, self.http_port, self.dicom_port, modalities, dicomweb), indent=2)
        )
        self.log = open(folder / "orthanc.log", "wb")
        self.process = subprocess.Popen([ORTHANC, str(config)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.get("/system")
                break
            except (urllib.error.URLError, ConnectionError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"Orthanc did not start; see {folder / 'orthanc.log'}") from None
                time.sleep(0.1)

    def request(self, method: str, path: str, body: bytes | None = None, timeout: float = 60):
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as response:
            data = response.read()
        return json.loads(data) if data and response.headers.get_content_type() == "application/json" else data

    def get(self, path: str):
        return self.request("GET", path)

    def upload(self, dicom: bytes) -> dict:
        """POST /instances: store a DICOM file; returns Orthanc's answer (ID, ParentStudy, ...)."""
        return self.request("POST", "/instances", dicom)

    def store_to(self, modality: str, instance_ids: list[str]) -> dict:
        """Ask Orthanc to C-STORE instances to one of its DicomModalities."""
        return self.request("POST", f"/modalities/{modality}/store", json.dumps(instance_ids).encode())

    def study_instances(self, study_id: str) -> list[dict]:
        return self.get(f"/studies/{study_id}/instances")

    def instance_file(self, instance_id: str) -> bytes:
        return self.get(f"/instances/{instance_id}/file")

    def wait_for(self, condition, timeout: float = 30.0, every: float = 0.1):
        """Poll ``condition()`` until it returns something true, or fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(every)
        raise AssertionError(f"not reached within {timeout} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def chest_dicom(
    image_path: Path,
    *,
    sop_class: str = "1.2.840.10008.5.1.4.1.1.1",
    jpeg: bool = True,
    study_uid: str | None = None,
    patient_id: str = "PNEUMOSCAN-TEST",
    frames: int = 1,
) -> bytes:
    """A CR (default) or DX image of a real chest X-ray. ``jpeg``: the original JPEG file encapsulated as
    JPEG Baseline (as a JPEG-compressing modality would send it); otherwise 12-bit values, uncompressed."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

    raw = Path(image_path).read_bytes()
    image = Image.open(io.BytesIO(raw))
    grey = np.asarray(image.convert("L"))
    if image.mode != "L":  # a colour-encoded JPEG: stored as a grey one, as a modality would
        buf = io.BytesIO()
        Image.fromarray(grey).save(buf, "JPEG", quality=95)
        raw = buf.getvalue()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), generate_uid()
    ds.Modality = "CR" if sop_class.endswith(".1.1") else "DX"
    ds.PatientID, ds.PatientName, ds.PatientSex, ds.PatientBirthDate = patient_id, "Test^Chest", "O", ""
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20261201", "120000", "1"
    ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
    ds.SeriesNumber, ds.InstanceNumber, ds.BodyPartExamined, ds.ViewPosition = 1, 1, "CHEST", "PA"
    if ds.Modality == "DX":
        ds.PresentationIntentType, ds.ImageType = "FOR PRESENTATION", ["ORIGINAL", "PRIMARY"]
    ds.Rows, ds.Columns = grey.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if jpeg:
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = encapsulate([raw] * frames)
    else:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelData = np.tile(grey.astype(np.uint16) * 16, (frames, 1)).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def bomb_dicom(study_uid: str | None = None) -> bytes:
    """A JPEG Baseline CR whose header claims 60000 x 60000 pixels (3.6 gigapixels) over a tiny payload."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, generate_uid

    small = io.BytesIO()
    Image.new("L", (64, 64), 128).save(small, "JPEG")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1", generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = "CR", "PNEUMOSCAN-BOMB", "Test^Bomb"
    ds.Rows, ds.Columns = 60000, 60000
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([small.getvalue()])
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
