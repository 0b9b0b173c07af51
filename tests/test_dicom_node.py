"""The DICOM node against a real PACS: Orthanc (Debian's package) on loopback ports sends real chest X-rays to
``pneumoscan listen`` and must get a structured report back in the same study; dcmtk's storescu is the second
sender. Refusals (an AE title not allowed, an unknown SOP class, a decompression bomb, an oversized PDU) must
leave the node serving."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
from conftest import DATA, real_images
from pacs import STORESCU, Orthanc, bomb_dicom, chest_dicom, free_port

from pneumoscan.cli.main import main
from pneumoscan.inference.classifier import Classifier
from pneumoscan.io.dicom_sr import finding_of
from pneumoscan.serving.dicom_node import DicomNode, NodeLimits, Peer, destination

pytestmark = [pytest.mark.dicom, pytest.mark.data]

PNEUMONIA_FILM = DATA / "fullres_sample" / "PNEUMONIA" / "person1411_bacteria_3593.jpeg"  # model: 1.00
NORMAL_FILM = DATA / "fullres_sample" / "NORMAL" / "IM-0286-0001.jpeg"  # model: 0.001
SENDER = "STORESCU"


@pytest.fixture(scope="module")
def classifier():
    return Classifier.load(int8=True)  # the bundle's own int8 model: no export on first use


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, classifier):
    """Orthanc, and a node answering it (plus a second node with --send-cam); both known to Orthanc."""
    node_port, cam_port = free_port(), free_port()
    orthanc = Orthanc(
        tmp_path_factory.mktemp("orthanc"),
        {"pneumoscan": ["PNEUMOSCAN", "127.0.0.1", node_port], "pneumoscan-cam": ["PNEUMOSCAN", "127.0.0.1", cam_port]},
    )
    peer = Peer("ORTHANC", "127.0.0.1", orthanc.dicom_port)
    allow = ["ORTHANC", SENDER]
    out = tmp_path_factory.mktemp("node")
    node = DicomNode(classifier, out, port=node_port, send_to=peer, allow=allow)
    cam_node = DicomNode(classifier, out / "cam", port=cam_port, send_to=peer, allow=allow, send_cam=True)
    node.start()
    cam_node.start()
    yield orthanc, node, cam_node
    node.stop()
    cam_node.stop()
    orthanc.stop()


def study_id(orthanc: Orthanc, study_uid: str) -> str | None:
    found = orthanc.request("POST", "/tools/lookup", study_uid.encode())
    return next((x["ID"] for x in found if x["Type"] == "Study"), None)


def answers_in(orthanc: Orthanc, study_uid: str, sop_class: str = "1.2.840.10008.5.1.4.1.1.88.33") -> list:
    """The instances of one SOP class (default Comprehensive SR) that Orthanc holds in a study, as datasets."""
    out, study = [], study_id(orthanc, study_uid)
    for instance in orthanc.study_instances(study) if study else []:
        ds = pydicom.dcmread(io.BytesIO(orthanc.instance_file(instance["ID"])))
        if ds.SOPClassUID == sop_class:
            out.append(ds)
    return out


def wait_for_answers(orthanc: Orthanc, study_uid: str, count: int = 1, timeout: float = 30, **kw) -> list:
    return orthanc.wait_for(lambda: len(found := answers_in(orthanc, study_uid, **kw)) >= count and found, timeout)


def rows(node: DicomNode) -> list[dict]:
    return [json.loads(line) for line in node.results_path.read_text().splitlines()]


def row_for(node: DicomNode, sop_uid: str, timeout: float = 30) -> dict:
    def find():
        return next((r for r in rows(node) if r.get("sop_instance_uid") == sop_uid), None)

    deadline = time.monotonic() + timeout
    while (row := find()) is None:
        assert time.monotonic() < deadline, f"no result row for {sop_uid}"
        time.sleep(0.05)
    return row


def texts(ds) -> list[str]:
    found, stack = [], list(ds.ContentSequence)
    while stack:
        item = stack.pop()
        if item.ValueType == "TEXT":
            found.append(item.TextValue)
        stack += list(item.get("ContentSequence", []))
    return found


def storescu(port: int, *files: Path, calling: str = SENDER, timeout: float = 120) -> subprocess.CompletedProcess:
    args = [STORESCU, "-aet", calling, "-aec", "PNEUMOSCAN", "-xy", "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    ("film", "truth", "sop_class", "jpeg"),
    [
        (PNEUMONIA_FILM, "PNEUMONIA", "1.2.840.10008.5.1.4.1.1.1", True),  # CR, JPEG baseline
        (NORMAL_FILM, "NORMAL", "1.2.840.10008.5.1.4.1.1.1.1", False),  # DX for presentation, 12-bit uncompressed
    ],
)
def test_orthanc_sends_an_image_and_gets_a_report_in_the_same_study(pacs, classifier, film, truth, sop_class, jpeg):
    orthanc, node, _ = pacs
    data = chest_dicom(film, sop_class=sop_class, jpeg=jpeg)
    source = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    stored = orthanc.upload(data)
    assert orthanc.store_to("pneumoscan", [stored["ID"]])["FailedInstancesCount"] == 0

    (sr,) = wait_for_answers(orthanc, source.StudyInstanceUID)
    assert finding_of(sr) == truth
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert evidence.ReferencedSOPInstanceUID == source.SOPInstanceUID
    words = " ".join(texts(sr))
    assert "research use only" in words.lower()
    assert classifier.bundle.weights_sha256 in words and "threshold rule: balanced" in words

    row = row_for(node, source.SOPInstanceUID)
    direct = classifier.predict_one(io.BytesIO(data))
    assert row["label"] == truth == direct.label
    assert row["probability"] == pytest.approx(direct.probability)
    assert row["study_instance_uid"] == source.StudyInstanceUID
    assert row["series_instance_uid"] == source.SeriesInstanceUID
    assert row["calling_ae"] == "ORTHANC" and row["sr_instance_uid"] == sr.SOPInstanceUID
    assert {"gate_score", "gate_limit", "threshold"} <= row.keys()


def test_storescu_sends_and_the_report_reaches_orthanc(pacs, tmp_path):
    orthanc, node, _ = pacs
    path = tmp_path / "cr.dcm"
    path.write_bytes(chest_dicom(PNEUMONIA_FILM))
    source = pydicom.dcmread(path, stop_before_pixels=True)
    done = storescu(node.port, path)
    assert done.returncode == 0, done.stderr
    (sr,) = wait_for_answers(orthanc, source.StudyInstanceUID)
    assert finding_of(sr) == "PNEUMONIA"
    assert row_for(node, source.SOPInstanceUID)["calling_ae"] == SENDER


def test_reports_go_by_dicomweb_stow_rs(classifier, tmp_path):
    """--send-to http://.../dicom-web: the same report, stored through Orthanc's DICOMweb plugin (STOW-RS); a URL
    the service does not serve is each image's send_error."""
    orthanc = Orthanc(tmp_path / "orthanc", {}, dicomweb=True)
    url = f"http://127.0.0.1:{orthanc.http_port}/dicom-web"
    good = DicomNode(classifier, tmp_path / "good", port=free_port(), send_to=destination(url), allow=[SENDER])
    wrong = DicomNode(classifier, tmp_path / "bad", port=free_port(), send_to=destination(url + "/nowhere"))
    good.start()
    wrong.start()
    try:
        path = tmp_path / "cr.dcm"
        path.write_bytes(chest_dicom(PNEUMONIA_FILM))
        source = pydicom.dcmread(path, stop_before_pixels=True)
        assert storescu(good.port, path).returncode == 0
        (sr,) = wait_for_answers(orthanc, source.StudyInstanceUID)
        assert finding_of(sr) == "PNEUMONIA" and sr.StudyInstanceUID == source.StudyInstanceUID
        assert row_for(good, source.SOPInstanceUID)["sr_instance_uid"] == sr.SOPInstanceUID
        assert storescu(wrong.port, path).returncode == 0
        failed = row_for(wrong, source.SOPInstanceUID)
        assert "HTTP 404" in failed["send_error"] and "sr_instance_uid" not in failed
        assert failed["label"] == "PNEUMONIA"  # the result itself is kept
    finally:
        good.stop()
        wrong.stop()
        orthanc.stop()


def test_send_cam_adds_a_secondary_capture_in_a_new_series(pacs):
    orthanc, _, cam_node = pacs
    data = chest_dicom(PNEUMONIA_FILM)
    source = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    orthanc.store_to("pneumoscan-cam", [orthanc.upload(data)["ID"]])
    (cam,) = wait_for_answers(orthanc, source.StudyInstanceUID, sop_class="1.2.840.10008.5.1.4.1.1.7", timeout=60)
    assert cam.SeriesInstanceUID not in (source.SeriesInstanceUID,)
    assert cam.PhotometricInterpretation == "RGB" and cam.pixel_array.ndim == 3
    assert "research use only" in cam.ImageComments
    assert row_for(cam_node, source.SOPInstanceUID)["cam_instance_uid"] == cam.SOPInstanceUID


def test_a_calling_ae_title_not_allowed_is_rejected(pacs, tmp_path):
    _, node, _ = pacs
    path = tmp_path / "cr.dcm"
    path.write_bytes(chest_dicom(NORMAL_FILM))
    uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
    refused = storescu(node.port, path, calling="INTRUDER")
    assert refused.returncode != 0
    assert "reject" in (refused.stdout + refused.stderr).lower()
    assert storescu(node.port, path).returncode == 0  # an allowed sender still gets through
    assert row_for(node, uid)["calling_ae"] == SENDER
    assert all(r["calling_ae"] != "INTRUDER" for r in rows(node))


def test_an_unknown_sop_class_is_rejected_at_association(pacs):
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, DigitalXRayImageStorageForProcessing

    _, node, _ = pacs
    ae = AE(ae_title=SENDER)
    for sop in (CTImageStorage, DigitalXRayImageStorageForProcessing):
        ae.add_requested_context(sop)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PNEUMOSCAN")
    try:
        assert not assoc.is_established or not assoc.accepted_contexts
    finally:
        if assoc.is_established:
            assoc.release()


@pytest.mark.parametrize(
    "change",
    [
        {"Modality": "CT"},
        {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.2"},  # CT Image Storage
        {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.1.1", "Modality": "DX", "PresentationIntentType": "FOR PROCESSING"},
        {"Modality": "DX", "PresentationIntentType": "for processing "},
        {"Modality": ""},
    ],
    ids=["ct-modality", "ct-sop-class", "dx-for-processing", "dx-for-processing-lower-case", "no-modality"],
)
def test_a_dataset_that_is_no_cr_or_dx_for_presentation_is_refused_whatever_context_carried_it(
    classifier, tmp_path, change, monkeypatch
):
    """A CT or DX-for-processing dataset sent on an accepted CR context: refused by its own header (0xA900), no row."""
    from pynetdicom import AE, _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # a file goes as its bytes, on its meta's context

    node = DicomNode(classifier, tmp_path / "out", port=free_port(), allow=[SENDER])
    node.start()
    try:
        ds = pydicom.dcmread(io.BytesIO(chest_dicom(NORMAL_FILM)))
        for keyword, value in change.items():
            setattr(ds, keyword, value)
        good = pydicom.dcmread(io.BytesIO(chest_dicom(PNEUMONIA_FILM)))
        ae = AE(ae_title=SENDER)
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", ds.file_meta.TransferSyntaxUID)  # CR Image Storage
        assoc = ae.associate("127.0.0.1", node.port, ae_title="PNEUMOSCAN")
        assert assoc.is_established
        try:
            ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # the context it is sent on
            sent = tmp_path / "sent.dcm"
            ds.save_as(sent)
            status = assoc.send_c_store(sent)
            good.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
            assert assoc.send_c_store(good).Status == 0x0000  # the association goes on
        finally:
            assoc.release()
        assert status.Status == 0xA900
        assert row_for(node, good.SOPInstanceUID)["label"] == "PNEUMONIA"
        assert [r["sop_instance_uid"] for r in rows(node)] == [good.SOPInstanceUID]  # nothing of the refused one
    finally:
        node.stop()


def test_a_decompression_bomb_is_refused_with_a_report_and_the_node_keeps_serving(pacs, tmp_path):
    orthanc, node, _ = pacs
    bomb, good = tmp_path / "bomb.dcm", tmp_path / "good.dcm"
    bomb.write_bytes(bomb_dicom())
    good.write_bytes(chest_dicom(PNEUMONIA_FILM))
    bomb_header = pydicom.dcmread(bomb, stop_before_pixels=True)
    assert storescu(node.port, bomb, good).returncode == 0
    (refusal,) = wait_for_answers(orthanc, bomb_header.StudyInstanceUID)
    assert finding_of(refusal) == "REFUSED"
    assert any("Refused" in t and "limit" in t for t in texts(refusal))
    row = row_for(node, bomb_header.SOPInstanceUID)
    assert "limit" in row["error"] and "label" not in row
    good_uid = pydicom.dcmread(good, stop_before_pixels=True).SOPInstanceUID
    assert row_for(node, good_uid)["label"] == "PNEUMONIA"


def test_a_multi_frame_image_over_the_decoding_limit_is_refused(pacs, tmp_path):
    """20 frames of a 2102 x 1974 film: 83 MB decoded, over the loader's 64 MB DICOM limit, refused from the header."""
    orthanc, node, _ = pacs
    path = tmp_path / "frames.dcm"
    path.write_bytes(chest_dicom(NORMAL_FILM.with_name("IM-0147-0001.jpeg"), frames=20))
    header = pydicom.dcmread(path, stop_before_pixels=True)
    assert storescu(node.port, path).returncode == 0
    row = row_for(node, header.SOPInstanceUID)
    assert "20 frame(s)" in row["error"] and "limit" in row["error"]
    (refusal,) = wait_for_answers(orthanc, header.StudyInstanceUID)
    assert finding_of(refusal) == "REFUSED"


def test_a_dataset_over_the_size_limit_ends_the_association_and_the_node_keeps_serving(
    classifier, tmp_path, monkeypatch
):
    """The association ends as the dataset passes the limit; the file it was being received into is removed."""
    import tempfile

    incoming = tmp_path / "tmp"
    incoming.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(incoming))  # where pynetdicom receives datasets
    limits = NodeLimits(max_dataset_bytes=2 * 2**20)
    node = DicomNode(classifier, tmp_path / "out", port=free_port(), allow=[SENDER], limits=limits)
    node.start()
    try:
        big, small = tmp_path / "big.dcm", tmp_path / "small.dcm"
        big.write_bytes(chest_dicom(NORMAL_FILM, jpeg=False))  # 1982 x 1804 x 16 bit: 7 MB
        small.write_bytes(chest_dicom(real_images("val", "NORMAL", 1)[0]))
        assert storescu(node.port, big).returncode != 0
        assert storescu(node.port, small).returncode == 0
        uid = pydicom.dcmread(small, stop_before_pixels=True).SOPInstanceUID
        assert row_for(node, uid)["label"] == "NORMAL"
        assert len(rows(node)) == 1  # nothing of the big one was classified
        assert not list(incoming.iterdir())  # nor left on disk
    finally:
        node.stop()


def test_a_crash_while_classifying_is_that_image_s_error_and_the_node_goes_on(classifier, tmp_path, monkeypatch):
    node = DicomNode(classifier, tmp_path / "out", port=free_port(), allow=[SENDER])
    calls = []

    def crash_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated crash inside the model")
        return Classifier.predict(classifier, *args, **kwargs)

    monkeypatch.setattr(classifier, "predict", crash_once)
    node.start()
    try:
        first, second = tmp_path / "1.dcm", tmp_path / "2.dcm"
        first.write_bytes(chest_dicom(NORMAL_FILM))
        second.write_bytes(chest_dicom(PNEUMONIA_FILM))
        assert storescu(node.port, first).returncode == 0
        wait_rows(node, 1)
        assert storescu(node.port, second).returncode == 0
        uid = pydicom.dcmread(second, stop_before_pixels=True).SOPInstanceUID
        assert row_for(node, uid)["label"] == "PNEUMONIA"
        crashed = rows(node)[0]
        assert crashed["error"] == "internal error (RuntimeError)" and "label" not in crashed
    finally:
        node.stop()


def wait_rows(node: DicomNode, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while len(rows(node)) < count:
        assert time.monotonic() < deadline, f"fewer than {count} result rows"
        time.sleep(0.05)


def test_images_beyond_the_byte_budget_are_answered_out_of_resources(classifier, tmp_path, monkeypatch):
    """While the model is stuck, the node holds at most ``queued_bytes`` of images; further stores are refused
    with status A700 (out of resources) instead of growing memory, and everything acknowledged is answered."""
    from pynetdicom import AE

    data = chest_dicom(real_images("val", "NORMAL", 1)[0])
    limits = NodeLimits(queued_bytes=3 * len(data) + 1000, queue_wait=0.5)
    node = DicomNode(classifier, tmp_path / "out", port=free_port(), allow=[SENDER], limits=limits)
    stuck = threading.Event()
    monkeypatch.setattr(
        classifier, "predict", lambda *a, **k: stuck.wait(30) and Classifier.predict(classifier, *a, **k)
    )
    node.start()
    try:
        ae = AE(ae_title=SENDER)
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.4.50")
        assoc = ae.associate("127.0.0.1", node.port, ae_title="PNEUMOSCAN")
        statuses = []
        for _ in range(6):
            ds = pydicom.dcmread(io.BytesIO(data))
            ds.SOPInstanceUID = pydicom.uid.generate_uid()
            statuses.append(assoc.send_c_store(ds).Status)
            assert node._budget.used <= limits.queued_bytes
        assoc.release()
        stuck.set()
        accepted = statuses.count(0x0000)
        assert 3 <= accepted < 6 and statuses.count(0xA700) == 6 - accepted, [hex(s) for s in statuses]
        wait_rows(node, accepted)
        assert all(r["label"] == "NORMAL" for r in rows(node))
    finally:
        stuck.set()
        node.stop()


class PeakRSS:
    """This process's peak resident memory from now on, in MB: the kernel's high-water mark reset here (or, where
    /proc/self/clear_refs is not writable, VmRSS sampled every 5 ms)."""

    def __init__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.exact = True
        except OSError:
            self.exact = False
        self.start = self.sampled = self._read("VmRSS")
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    @staticmethod
    def _read(key: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        raise AssertionError(f"no {key} in /proc/self/status")

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.sampled = max(self.sampled, self._read("VmRSS"))

    def growth(self) -> float:
        self._stop.set()
        self._sampler.join()
        return (self._read("VmHWM") if self.exact else self.sampled) - self.start


def test_datasets_arriving_at_once_are_received_to_disk_not_memory(classifier, tmp_path, monkeypatch):
    """Four 43 MB C-STOREs (6 uncompressed frames of a real film) from four storescu processes at once, the model
    held back: each is written to a file as it arrives and acknowledged from the spool, so the node's memory grows
    by far less than one dataset (holding each in memory, as pynetdicom does by default, costs about twice its
    size per association: 340 MB here). Then every one is classified from the spool."""
    import tempfile

    incoming = tmp_path / "tmp"
    incoming.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(incoming))  # where pynetdicom receives datasets
    senders = [f"BIG{n}" for n in range(4)]
    files = []
    for n in range(len(senders)):
        files.append(tmp_path / f"big{n}.dcm")
        files[-1].write_bytes(chest_dicom(NORMAL_FILM, jpeg=False, frames=6))
    size_mb = files[0].stat().st_size / 2**20
    assert size_mb > 40
    held = threading.Event()
    monkeypatch.setattr(
        classifier, "predict", lambda *a, **k: held.wait(60) and Classifier.predict(classifier, *a, **k)
    )
    node = DicomNode(classifier, tmp_path / "out", port=free_port(), allow=senders)
    node.start()
    try:
        peak = PeakRSS()
        sending = [
            subprocess.Popen(
                [STORESCU, "-aet", title, "-aec", "PNEUMOSCAN", "-xy", "127.0.0.1", str(node.port), str(path)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for title, path in zip(senders, files)
        ]
        assert [s.wait(60) for s in sending] == [0] * len(senders)
        growth = peak.growth()
        assert len(list(node.spool.glob("*.dcm"))) == len(senders)  # every one acknowledged, from the spool
        assert not list(incoming.iterdir())  # each received file was moved there
        assert growth < size_mb / 2, f"memory grew {growth:.0f} MB receiving 4 x {size_mb:.0f} MB"
        held.set()
        wait_rows(node, len(senders), timeout=60)
        assert [r.get("label") for r in rows(node)] == ["NORMAL"] * len(senders), rows(node)
        assert sorted(r["calling_ae"] for r in rows(node)) == senders
    finally:
        held.set()
        node.stop()
    assert not list(node.spool.iterdir())


def test_receiving_to_files_is_on_while_a_node_serves_and_a_store_still_works_without_it(
    classifier, tmp_path, monkeypatch
):
    """pynetdicom's receive-to-file setting is process-wide: a node turns it on while it serves and puts it back
    when the last node stops. A received file on another file system than the spool is copied there, not moved;
    should something else turn the setting off meanwhile, stores are held in memory as before."""
    import errno
    import tempfile

    from pynetdicom import _config

    import pneumoscan.serving.dicom_node as dicom_node

    incoming = tmp_path / "tmp"
    incoming.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(incoming))
    move = os.replace

    def across_file_systems(src, dst):
        if Path(src).parent == incoming:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        move(src, dst)

    monkeypatch.setattr(dicom_node.os, "replace", across_file_systems)
    films = [tmp_path / "copied.dcm", tmp_path / "in-memory.dcm"]
    for path, film in zip(films, real_images("val", "NORMAL", 2)):
        path.write_bytes(chest_dicom(film))
    before = _config.STORE_RECV_CHUNKED_DATASET
    node = DicomNode(classifier, tmp_path / "out", port=free_port(), allow=[SENDER])
    node.start()
    try:
        assert _config.STORE_RECV_CHUNKED_DATASET is True
        assert storescu(node.port, films[0]).returncode == 0
        _config.STORE_RECV_CHUNKED_DATASET = False
        try:
            assert storescu(node.port, films[1]).returncode == 0
        finally:
            _config.STORE_RECV_CHUNKED_DATASET = True
        for path in films:
            uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
            assert row_for(node, uid)["label"] == "NORMAL"
        assert not list(incoming.iterdir())  # the copied one removed by pynetdicom after the handler
    finally:
        node.stop()
    assert _config.STORE_RECV_CHUNKED_DATASET is (True if dicom_node._receiving_nodes else before)


def test_an_oversized_pdu_closes_the_connection_and_the_node_keeps_serving(pacs):
    _, node, _ = pacs
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as s:
        s.sendall(struct.pack(">BBL", 0x01, 0, 2**31) + b"\0" * 4096)  # an A-ASSOCIATE-RQ claiming 2 GB
        s.settimeout(10)
        started = time.monotonic()
        try:
            while s.recv(4096):
                pass
        except ConnectionResetError:
            pass
        assert time.monotonic() - started < 5  # closed at once, not after reading 2 GB
    echo = subprocess.run(
        ["echoscu", "-aet", SENDER, "-aec", "PNEUMOSCAN", "127.0.0.1", str(node.port)], capture_output=True, timeout=30
    )
    assert echo.returncode == 0


def test_predict_sr_writes_the_same_report_for_dicom_files(tmp_path, capsys):
    dcm, bomb, jpeg = tmp_path / "chest.dcm", tmp_path / "bomb.dcm", tmp_path / "chest.jpeg"
    dcm.write_bytes(chest_dicom(NORMAL_FILM, sop_class="1.2.840.10008.5.1.4.1.1.1.1"))
    bomb.write_bytes(bomb_dicom())
    jpeg.write_bytes(PNEUMONIA_FILM.read_bytes())
    code = main(
        ["predict", str(dcm), str(bomb), str(jpeg), "--int8", "--format", "jsonl", "--sr", str(tmp_path / "sr")]
    )
    out, err = capsys.readouterr()
    assert code == 1  # the bomb failed; the rest was processed
    results = {Path(r["path"]).name: r for r in map(json.loads, out.splitlines())}
    reports = {}
    for path in (tmp_path / "sr").iterdir():
        sr = pydicom.dcmread(path)
        reports[sr.CurrentRequestedProcedureEvidenceSequence[0].StudyInstanceUID] = sr
    assert len(reports) == 2
    source = pydicom.dcmread(dcm, stop_before_pixels=True)
    assert finding_of(reports[source.StudyInstanceUID]) == results["chest.dcm"]["label"] == "NORMAL"
    refused = reports[pydicom.dcmread(bomb, stop_before_pixels=True).StudyInstanceUID]
    assert finding_of(refused) == "REFUSED" and "limit" in results["bomb.dcm"]["error"]
    assert "chest.jpeg" in err and "not a DICOM file" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["listen", "--send-to", "ORTHANC@localhost"], "AETITLE@HOST:PORT"),
        (["listen", "--send-cam"], "--send-cam goes with --send-to"),
        (["listen", "--send-to", "http:// space"], "not a DICOMweb URL"),
        (["listen", "--ae-title", "WAY-TOO-LONG-AE-TITLE"], "not an AE title"),
    ],
)
def test_listen_usage_errors_are_one_line_and_exit_2(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_two_concurrent_senders_200_images_all_get_a_report(pacs, tmp_path):
    """100 images from each of two storescu processes at once: 200 reports in Orthanc, none lost."""
    orthanc, node, _ = pacs
    films = real_images("train", "NORMAL", 50) + real_images("train", "PNEUMONIA", 50)
    study_uid = pydicom.uid.generate_uid()
    folders = []
    for sender in ("a", "b"):
        folder = tmp_path / sender
        folder.mkdir()
        for n, film in enumerate(films):
            (folder / f"{n:03d}.dcm").write_bytes(chest_dicom(film, study_uid=study_uid))
        folders.append(folder)
    before = len(rows(node))
    results = []
    senders = [
        threading.Thread(target=lambda f=f: results.append(storescu(node.port, *sorted(f.iterdir())))) for f in folders
    ]
    for t in senders:
        t.start()
    for t in senders:
        t.join()
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-500:] for r in results]
    orthanc.wait_for(lambda: len(rows(node)) - before >= 200, timeout=60)
    new = rows(node)[before:]
    assert len(new) == 200 and all("sr_instance_uid" in r and r.get("label") for r in new)
    sid = study_id(orthanc, study_uid)

    def reports_held() -> int:
        series = orthanc.get(f"/studies/{sid}/series")
        return sum(len(s["Instances"]) for s in series if s["MainDicomTags"].get("Modality") == "SR")

    assert orthanc.wait_for(lambda: reports_held() == 200, timeout=30)


def test_sigterm_answers_the_images_already_received(tmp_path):
    """``pneumoscan listen`` as a process: images stored just before SIGTERM are all classified and written."""
    port = free_port()
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = [sys.executable, "-m", "pneumoscan.cli", "listen", "--int8", "--port", str(port), "--out", str(out)]
    node = subprocess.Popen(args + ["--allow", SENDER], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        echo = ["echoscu", "-aet", SENDER, "-aec", "PNEUMOSCAN", "127.0.0.1", str(port)]
        while subprocess.run(echo, capture_output=True).returncode != 0:
            assert node.poll() is None and time.monotonic() < deadline, "listen did not start"
            time.sleep(0.2)
        files = []
        for n, film in enumerate(real_images("val", "PNEUMONIA", 8) + real_images("val", "NORMAL", 8)):
            files.append(tmp_path / f"{n}.dcm")
            files[-1].write_bytes(chest_dicom(film))
        assert storescu(port, *files).returncode == 0
        node.send_signal(signal.SIGTERM)
        _, err = node.communicate(timeout=60)
    finally:
        if node.poll() is None:
            node.kill()
    assert node.returncode == 0, err[-1000:]
    written = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(written) == 16 and all(r.get("label") in ("NORMAL", "PNEUMONIA") for r in written), written
    assert "16 received, 16 classified" in err
    assert "any calling AE title" not in err  # --allow given: no warning


def test_listen_warns_without_allow_and_a_busy_port_is_one_line_exit_2(capsys, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        assert main(["listen", "--int8", "--port", port, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "any calling AE title may store images here" in err[0]
    assert err[-1].startswith("pneumoscan: error: cannot listen on 127.0.0.1:") and len(err) == 2


def test_every_listen_option_is_explained():
    from pneumoscan.cli.main import build_parser

    parser = build_parser()
    listen = next(a for a in parser._actions if a.dest == "command").choices["listen"]
    options = [a for a in listen._actions if a.option_strings and a.dest != "help"]
    assert {"--send-to", "--send-cam", "--allow", "--ae-title", "--port", "--host", "--out", "--model"} <= {
        o for a in options for o in a.option_strings
    }
    assert all(a.help for a in options)


EXAMPLE_CR = Path(__file__).parents[1] / "src" / "pneumoscan" / "examples" / "dicom" / "person1946_bacteria_4875.dcm"


@pytest.mark.parametrize(
    ("changes", "context"),
    [
        ({"Modality": "CT"}, "1.2.840.10008.5.1.4.1.1.1"),  # says CT, on a CR context
        ({"Modality": "DX", "PresentationIntentType": "FOR PROCESSING"}, "1.2.840.10008.5.1.4.1.1.1"),
        (
            {
                "Modality": "DX",
                "PresentationIntentType": "FOR PROCESSING",
                "SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.1",
            },
            "1.2.840.10008.5.1.4.1.1.1.1",  # DX for processing content on the DX for presentation context
        ),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.2"}, "1.2.840.10008.5.1.4.1.1.1"),  # CT Image Storage UID
    ],
)
def test_a_dataset_that_is_not_a_radiograph_for_presentation_is_rejected_whatever_its_context(
    classifier, tmp_path, caplog, changes, context
):
    """The dataset's own Modality, SOP Class UID and Presentation Intent Type are judged, not the context it came
    on: a failure status, a log line, no row; a real CR image on the same association is still classified."""
    from pynetdicom import AE

    node = DicomNode(classifier, tmp_path / "out", port=free_port(), allow=[SENDER])
    node.start()
    try:
        ae = AE(ae_title=SENDER)
        for sop in {context, "1.2.840.10008.5.1.4.1.1.1"}:
            ae.add_requested_context(sop, "1.2.840.10008.1.2.4.50")
        assoc = ae.associate("127.0.0.1", node.port, ae_title="PNEUMOSCAN")
        assert assoc.is_established
        wrong = pydicom.dcmread(EXAMPLE_CR)
        for keyword, value in changes.items():
            setattr(wrong, keyword, value)
        wrong.file_meta.MediaStorageSOPClassUID = wrong.SOPClassUID
        wrong.SOPInstanceUID = pydicom.uid.generate_uid()
        with caplog.at_level("WARNING", logger="pneumoscan.dicom"):
            status = send_on_context(assoc, wrong, context)
        good = pydicom.dcmread(EXAMPLE_CR)
        good_status = assoc.send_c_store(good)
        assoc.release()
        assert status.Status >= 0xA000 and status.Status not in (0xB000, 0xB006, 0xB007), hex(status.Status)
        assert any("rejected" in r.getMessage() and SENDER in r.getMessage() for r in caplog.records)
        assert good_status.Status == 0x0000
        wait_rows(node, 1)
        time.sleep(0.5)
        assert [r["sop_instance_uid"] for r in rows(node)] == [good.SOPInstanceUID]
    finally:
        node.stop()


def send_on_context(assoc, dataset, abstract_syntax: str):
    """C-STORE ``dataset`` on the accepted context for ``abstract_syntax``, whatever SOP class it claims (as a
    careless or hostile sender can)."""
    (context,) = [c for c in assoc.accepted_contexts if c.abstract_syntax == abstract_syntax]
    choose = assoc._get_valid_context
    assoc._get_valid_context = lambda *args, **kwargs: context
    try:
        return assoc.send_c_store(dataset)
    finally:
        assoc._get_valid_context = choose


def test_one_peer_cannot_hold_every_association_and_idle_ones_are_ended(classifier, tmp_path):
    """A peer opening as many associations as it can gets its share (half of the slots), and keeping them with
    C-ECHOs does not keep them past the idle timeout; a second peer gets an association all along."""
    from pynetdicom import AE

    limits = NodeLimits(max_associations=4, network_timeout=2.0)
    node = DicomNode(classifier, tmp_path / "out", port=free_port(), allow=["HOG", SENDER], limits=limits)
    node.start()
    held = []
    try:
        hog = AE(ae_title="HOG")
        hog.add_requested_context("1.2.840.10008.1.1")
        for _ in range(limits.max_associations + 2):
            assoc = hog.associate("127.0.0.1", node.port, ae_title="PNEUMOSCAN")
            if assoc.is_established:
                held.append(assoc)
        other = AE(ae_title=SENDER)
        other.add_requested_context("1.2.840.10008.1.1")
        second = other.associate("127.0.0.1", node.port, ae_title="PNEUMOSCAN")
        assert second.is_established, "one peer holds every association"
        assert len(held) == limits.peer_share == 2, len(held)
        assert second.send_c_echo().Status == 0x0000
        second.release()
        started = time.monotonic()
        while any(a.is_established for a in held) and time.monotonic() - started < 10:
            for a in held:
                if a.is_established:
                    a.send_c_echo()  # keeps it busy, but never stores
            time.sleep(0.3)
        assert not any(a.is_established for a in held), "C-ECHOs kept the associations past the idle timeout"
        assert time.monotonic() - started < 2.0 + 3
    finally:
        for a in held:
            if a.is_established:
                a.abort()
        node.stop()


def start_listen(out: Path, port: int, *options: str) -> subprocess.Popen:
    """``pneumoscan listen`` as a process, once it answers C-ECHO."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = [sys.executable, "-m", "pneumoscan.cli", "listen", "--int8", "--port", str(port), "--out", str(out)]
    node = subprocess.Popen([*args, "--allow", SENDER, *options], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    echo = ["echoscu", "-aet", SENDER, "-aec", "PNEUMOSCAN", "127.0.0.1", str(port)]
    while subprocess.run(echo, capture_output=True).returncode != 0:
        if node.poll() is not None or time.monotonic() > deadline:
            node.kill()
            raise AssertionError(f"listen did not start: {node.communicate()[1][-1000:]}")
        time.sleep(0.2)
    return node


class SilentDestination:
    """A destination that accepts TCP connections and never answers a byte."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.held.append(self.server.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        self.server.close()
        for conn in self.held:
            conn.close()


def spooled_films(tmp_path: Path, count: int) -> tuple[list[Path], set[str]]:
    files = []
    for n, film in enumerate(real_images("val", "NORMAL", count)):
        files.append(tmp_path / f"{n}.dcm")
        files[-1].write_bytes(chest_dicom(film))
    return files, {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}


def test_sigterm_with_a_destination_that_never_answers_writes_every_row_within_the_bound(tmp_path):
    """Acknowledged images, a destination that accepts TCP and never answers: after SIGTERM the node exits within
    its stop timeout (plus start-up slack) with one row per acknowledged image, each saying it was not sent."""
    silent = SilentDestination()
    out, port = tmp_path / "out", free_port()
    options = ("--send-to", f"DEAD@127.0.0.1:{silent.port}", "--send-timeout", "3", "--stop-timeout", "8")
    node = start_listen(out, port, *options)
    try:
        files, uids = spooled_films(tmp_path, 10)  # more than the 4 send associations: some never get a try
        assert storescu(port, *files).returncode == 0
        node.send_signal(signal.SIGTERM)
        started = time.monotonic()
        _, err = node.communicate(timeout=60)
        took = time.monotonic() - started
    finally:
        if node.poll() is None:
            node.kill()
        silent.close()
    assert node.returncode == 0, err[-1000:]
    assert took < 8 + 4, f"exit took {took:.1f} s"
    written = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["sop_instance_uid"] for r in written} == uids and len(written) == len(uids)
    assert all(r["label"] == "NORMAL" and "send_error" in r and "sr_instance_uid" not in r for r in written)
    assert not list((out / "spool").iterdir())


def test_images_acknowledged_before_sigkill_are_answered_from_the_spool_at_the_next_start(tmp_path):
    """SIGKILL after acknowledgement (the destination never answers, so no row is written yet): the next start
    recovers each image from the spool and writes its row."""
    silent = SilentDestination()
    out, port = tmp_path / "out", free_port()
    node = start_listen(out, port, "--send-to", f"DEAD@127.0.0.1:{silent.port}")
    try:
        files, uids = spooled_films(tmp_path, 3)
        assert storescu(port, *files).returncode == 0
        node.kill()
        node.wait(30)
    finally:
        if node.poll() is None:
            node.kill()
        silent.close()
    results = out / "results.jsonl"
    assert not results.exists() or not results.read_text().strip()  # acknowledged, not yet answered
    again = start_listen(out, port)
    try:
        deadline = time.monotonic() + 60
        while len(results.read_text().splitlines()) < len(uids):
            assert time.monotonic() < deadline, "the spooled images were not answered"
            time.sleep(0.2)
    finally:
        again.send_signal(signal.SIGTERM)
        again.communicate(timeout=60)
    written = [json.loads(line) for line in results.read_text().splitlines()]
    assert {r["sop_instance_uid"] for r in written} == uids and len(written) == len(uids)
    assert all(r["label"] == "NORMAL" and r["recovered"] and r["calling_ae"] == SENDER for r in written)
    assert not list((out / "spool").iterdir())
