"""A DICOM node: C-ECHO and C-STORE service class provider that classifies the chest radiographs a PACS sends.

    >>> from pneumoscan import Classifier
    >>> from pneumoscan.serving.dicom_node import DicomNode, Peer
    >>> node = DicomNode(Classifier.load(), "results", send_to=Peer.parse("ORTHANC@127.0.0.1:4242"))
    >>> node.start(); ...; node.stop()

Each dataset is written to a file as it arrives (pynetdicom's ``STORE_RECV_CHUNKED_DATASET``: an association
holds about one PDU in memory, whatever the dataset's size), moved into ``OUT/spool/`` and fsynced, and only then
acknowledged (recovered at the next start) and queued (the queue is bounded, in images and bytes: a full queue
answers "out of resources" rather than growing). The worker reads it from the spool only to decode it, with
the one image loader (``io/images.py``: its pixel, memory and frame limits apply); it is classified with the input
gate on, written as one JSON line to ``OUT/results.jsonl`` (the ``predict --format jsonl`` record plus the study,
series and SOP instance UIDs) and, with ``send_to``, answered by a DICOM SR (``io/dicom_sr.py``) sent by C-STORE
(or DICOMweb STOW-RS to a ``StowTarget``); with ``send_cam``, also the Grad-CAM overlay.

Only CR and DX (for presentation) images are accepted, checked at association and again on each dataset's
own header (SOP class, modality, presentation intent); calling AE titles can be restricted; associations are
limited in number (in all, and per peer) and time (one without a C-STORE is ended), PDUs and datasets in size.
A failure on one image is that image's error row: the node keeps serving.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import queue
import re
import shutil
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from pydicom.uid import UID

from pneumoscan.core.errors import ConfigError, ImageError
from pneumoscan.core.options import ListenOptions
from pneumoscan.core.settings import DECLARED, declared
from pneumoscan.inference.classifier import Classifier
from pneumoscan.inference.result import Prediction
from pneumoscan.io.images import MAX_FILE_BYTES

LOG = logging.getLogger("pneumoscan.dicom")

CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
ACCEPTED_SOP_CLASSES = (CR_IMAGE, DX_FOR_PRESENTATION)
VERIFICATION = "1.2.840.10008.1.1"
UNCOMPRESSED = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")
COMPRESSED = (  # offered only where the installed pydicom handlers decode them
    "1.2.840.10008.1.2.4.50",  # JPEG baseline (8-bit)
    "1.2.840.10008.1.2.4.51",  # JPEG extended (12-bit)
    "1.2.840.10008.1.2.4.57",  # JPEG lossless
    "1.2.840.10008.1.2.4.70",  # JPEG lossless, first-order prediction
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE lossless
)
RESULTS_FILE = "results.jsonl"
SPOOL_FOLDER = "spool"  # under --out: every acknowledged image until its results row is written
AE_TITLE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")  # DICOM AE: 16 printable characters, no backslash
STATUS_SUCCESS, STATUS_OUT_OF_RESOURCES, STATUS_CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000
STATUS_NOT_THIS_SOP_CLASS = 0xA900  # C-STORE failure: the dataset does not match the SOP class
ACCEPTED_MODALITIES = ("CR", "DX")
STORE_OK = (0x0000, 0xB000, 0xB006, 0xB007)  # success, or success with a warning


@dataclass(frozen=True)
class Peer:
    """A DICOM node to send to: ``AETITLE@HOST:PORT``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Peer:
        match = re.fullmatch(r"(.+)@(\[[^\]]+\]|[^:@]+):(\d{1,5})", text.strip())
        if not match or not 0 < int(match[3]) < 65536:
            raise ConfigError(f"{text!r}: expected AETITLE@HOST:PORT (for example ORTHANC@127.0.0.1:4242)")
        return cls(check_ae_title(match[1]), match[2].strip("[]"), int(match[3]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class StowTarget:
    """A DICOMweb service to send to by STOW-RS: its base URL (``.../dicom-web``) or its ``/studies`` URL."""

    url: str

    @property
    def studies(self) -> str:
        return self.url if self.url.rstrip("/").endswith("/studies") else self.url.rstrip("/") + "/studies"

    def __str__(self) -> str:
        return self.url


def destination(text: str) -> Peer | StowTarget:
    """``--send-to``: ``AETITLE@HOST:PORT`` (C-STORE) or an ``http(s)://`` DICOMweb URL (STOW-RS)."""
    text = text.strip()
    if text.lower().startswith(("http://", "https://")):
        if not re.fullmatch(r"https?://[^/\s?#]+(/[^\s?#]*)?", text, re.IGNORECASE):
            raise ConfigError(f"{text!r}: not a DICOMweb URL (expected http(s)://HOST[:PORT]/PATH)")
        return StowTarget(text)
    return Peer.parse(text)


def check_ae_title(title: str) -> str:
    """An AE title as DICOM allows it (1-16 printable ASCII characters, no backslash), or a ConfigError."""
    if not AE_TITLE.fullmatch(title) or not title.strip():
        raise ConfigError(f"{title!r} is not an AE title (1-16 printable ASCII characters, no backslash)")
    return title.strip()


@dataclass(frozen=True)
class NodeLimits:
    """How much the network may ask of the node."""

    max_associations: int = ListenOptions.max_associations  # concurrent; more are rejected (local limit exceeded)
    acse_timeout: float = 30.0  # seconds to negotiate or release an association
    dimse_timeout: float = 60.0  # seconds to wait for a DIMSE message
    network_timeout: float = 60.0  # seconds an association is kept without a C-STORE (C-ECHOs do not count)
    peer_associations: int = 0  # concurrent associations one peer (calling AE title + address) may hold; 0: half
    max_pdu: int = 65536  # bytes per PDU we advertise; every PDU read is bounded at max(max_pdu, 1 MiB)
    max_dataset_bytes: int = MAX_FILE_BYTES  # one stored dataset; above it the connection is closed
    queue_size: int = 32  # received images held for classification; a full queue answers out of resources
    queued_bytes: int = 256 * 2**20  # and the bytes those images may take together (in the spool; so the worker
    # never decodes more than this at once: each file is read only while it is decoded)
    queue_wait: float = 10.0  # seconds a C-STORE waits for room in the queue
    batch_size: int = 16  # images classified together when several wait
    send_associations: int = 4  # concurrent associations to --send-to, each with one report in flight
    drain_timeout: float = 5.0  # on stop: seconds for open associations to close before they are aborted
    send_timeout: float = 10.0  # each step with --send-to: TCP connect, association, each DIMSE message, STOW-RS
    stop_timeout: float = 30.0  # on stop: every acknowledged image has its results row within this many seconds

    @property
    def peer_share(self) -> int:
        """How many of the association slots one peer may hold: ``peer_associations``, or half (at least 1)."""
        return self.peer_associations or max(1, self.max_associations // 2)


_KEYS = itertools.count()


@dataclass
class Received:
    """One acknowledged image. Its bytes are on disk (``spool``); the worker reads them only while decoding."""

    calling_ae: str
    size: int = 0  # bytes of the DICOM file
    held: int = 0  # bytes counted against the node's byte budget until released
    spool: Path | None = None  # its spooled copy, removed once its results row is written
    recovered: bool = False  # read back from the spool at start (the node had stopped before answering it)
    record: dict | None = None  # its results row, once classified
    key: int = field(default_factory=lambda: next(_KEYS))
    received: float = field(default_factory=time.monotonic)
    received_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="milliseconds"))


class _ByteBudget:
    """How many bytes of acknowledged images the node holds at once, not yet classified (or kept for a Grad-CAM):
    in the spool, and of them whatever the worker is decoding; a store waits for room, or is refused."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._room = threading.Condition()

    def take(self, size: int, timeout: float) -> bool:
        with self._room:
            if not self._room.wait_for(lambda: self.used == 0 or self.used + size <= self.limit, timeout):
                return False
            self.used += size
            return True

    def give(self, size: int) -> None:
        with self._room:
            self.used -= size
            self._room.notify_all()


class _NamedBytes(io.BytesIO):
    """Bytes that name themselves in results and error messages."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.name = name


class _SpooledImage:
    """A spooled file that names itself, read only when the loader reads it (so a batch is not held in memory
    while it waits to be decoded); each read opens the file again, from the position left by the last."""

    def __init__(self, path: Path, name: str):
        self.path, self.name, self._at = path, name, 0

    def read(self, size: int = -1) -> bytes:
        with open(self.path, "rb") as file:
            file.seek(self._at)
            data = file.read(size)
        self._at += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        self._at = offset if whence == 0 else self._at + offset if whence == 1 else self.path.stat().st_size + offset
        return self._at

    def tell(self) -> int:
        return self._at


_RECEIVE_TO_FILES = threading.Lock()
_receiving_nodes = 0
_chunked_before = False


def _receive_to_files(on: bool) -> None:
    """While at least one node serves, pynetdicom writes each incoming C-STORE dataset to a temporary file (in
    ``TMPDIR``) as its P-DATA arrives, instead of holding it in memory (``STORE_RECV_CHUNKED_DATASET``, a
    process-wide setting: it changes nothing for associations this process requests, and an SCP's
    ``event.dataset`` still works; ``event.encoded_dataset()`` does not). The setting is put back as it was when
    the last node stops."""
    global _receiving_nodes, _chunked_before
    from pynetdicom import _config

    with _RECEIVE_TO_FILES:
        if on:
            if _receiving_nodes == 0:
                _chunked_before = _config.STORE_RECV_CHUNKED_DATASET
                _config.STORE_RECV_CHUNKED_DATASET = True
            _receiving_nodes += 1
        else:
            _receiving_nodes -= 1
            if _receiving_nodes == 0:
                _config.STORE_RECV_CHUNKED_DATASET = _chunked_before


def why_not_a_radiograph(header) -> str | None:
    """Why a received dataset is not one this node classifies (its own SOP class, modality and presentation
    intent, whatever presentation context carried it), or None when it is a CR or DX image for presentation."""
    sop = str(header.get("SOPClassUID", "") or "")
    modality = str(header.get("Modality", "") or "").strip().upper()
    intent = str(header.get("PresentationIntentType", "") or "").strip().upper()
    if sop not in ACCEPTED_SOP_CLASSES:
        return f"SOP class {sop or '(none)'} is not CR or DX for presentation"
    if modality not in ACCEPTED_MODALITIES:
        return f"modality {modality or '(none)'} is not CR or DX"
    if intent and intent != "FOR PRESENTATION":
        return f"presentation intent {intent} (only FOR PRESENTATION is classified)"
    return None


def accepted_transfer_syntaxes() -> list[str]:
    """Uncompressed syntaxes, and the compressed ones the installed pixel handlers can decode."""
    from pydicom.pixels import get_decoder

    usable = []
    for uid in COMPRESSED:
        try:
            if get_decoder(uid).is_available:
                usable.append(uid)
        except NotImplementedError:
            continue
    return [*UNCOMPRESSED, *usable]


class Sender:
    """One association to the destination, opened when first needed and again after a failure."""

    def __init__(self, peer: Peer, ae_title: str, limits: NodeLimits):
        from pynetdicom import AE
        from pynetdicom.sop_class import ComprehensiveSRStorage, SecondaryCaptureImageStorage

        self.peer = peer
        self.ae = AE(ae_title=ae_title)
        self.ae.connection_timeout = self.ae.acse_timeout = limits.send_timeout
        self.ae.dimse_timeout = self.ae.network_timeout = limits.send_timeout
        self.ae.maximum_pdu_size = limits.max_pdu
        for sop in (ComprehensiveSRStorage, SecondaryCaptureImageStorage):
            self.ae.add_requested_context(sop, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        self.assoc = self._opening = None
        self.lock = threading.Lock()

    def _associate(self):
        from pynetdicom import evt

        def opened(event) -> None:
            self._opening = event.assoc

        handlers = [(evt.EVT_CONN_OPEN, opened)]
        try:
            return self.ae.associate(self.peer.host, self.peer.port, ae_title=self.peer.ae_title, evt_handlers=handlers)
        finally:
            self._opening = None

    def abandon(self) -> None:
        """Close the connection of whatever is in flight (from another thread): the node is stopping."""
        for assoc in (self._opening, self.assoc):
            socket = getattr(getattr(assoc, "dul", None), "socket", None)
            if socket is not None:
                socket.close()

    def send(self, dataset) -> None:
        """C-STORE one dataset; raises ``OSError`` with the reason when the destination does not take it."""
        with self.lock:
            for _attempt in (1, 2):
                if self.assoc is None or not self.assoc.is_established:
                    self.assoc = self._associate()
                    if not self.assoc.is_established:
                        self.assoc = None
                        raise OSError(f"{self.peer}: association refused or not answered")
                status = self.assoc.send_c_store(dataset)
                if status:
                    if status.Status in STORE_OK:
                        return
                    raise OSError(f"{self.peer}: C-STORE answered status 0x{int(status.Status):04X}")
                self.close_locked()  # no answer: the association died; one more try on a new one
            raise OSError(f"{self.peer}: C-STORE not answered")

    def close(self) -> None:
        with self.lock:
            self.close_locked()

    def close_locked(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()
        self.assoc = None


class StowSender:
    """STOW-RS: each instance POSTed alone as ``multipart/related; type="application/dicom"``."""

    def __init__(self, target: StowTarget, limits: NodeLimits):
        self.target, self.timeout = target, limits.send_timeout

    def send(self, dataset) -> None:
        """Store one dataset; raises ``OSError`` with the reason when the service does not take it."""
        import urllib.error
        import urllib.request
        import uuid

        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        boundary = uuid.uuid4().hex
        body = b"".join(
            [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), buffer.getvalue()]
            + [f"\r\n--{boundary}--\r\n".encode()]
        )
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        }
        request = urllib.request.Request(self.target.studies, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            raise OSError(f"{self.target}: STOW-RS answered HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise OSError(f"{self.target}: STOW-RS failed ({getattr(exc, 'reason', exc)})") from None
        if status != 200:
            raise OSError(f"{self.target}: STOW-RS answered HTTP {status} (not all stored)")

    def close(self) -> None:
        pass

    def abandon(self) -> None:
        pass  # urllib's timeout bounds each request


def make_sender(send_to: Peer | StowTarget, ae_title: str, limits: NodeLimits) -> Sender | StowSender:
    return StowSender(send_to, limits) if isinstance(send_to, StowTarget) else Sender(send_to, ae_title, limits)


class DicomNode:
    """The C-ECHO/C-STORE node around one :class:`Classifier` (see the module's docstring)."""

    @declared(ListenOptions, "out", "ae_title", "host", "port", "send_cam")
    def __init__(
        self,
        classifier: Classifier,
        out: str | Path,
        *,
        ae_title: str = DECLARED,
        host: str = DECLARED,
        port: int = DECLARED,
        send_to: Peer | StowTarget | None = None,
        send_cam: bool = DECLARED,
        allow: Sequence[str] | None = None,
        limits: NodeLimits = NodeLimits(),
    ):
        from pneumoscan.io.dicom_sr import ModelInfo
        from pneumoscan.io.fileio import ensure_folder

        self.classifier, self.limits = classifier, limits
        self.ae_title, self.host, self.port = check_ae_title(ae_title), host, port
        self.allow = [check_ae_title(a) for a in allow] if allow else None
        self.send_to, self.send_cam = send_to, send_cam
        self.model = ModelInfo.of(classifier.bundle)
        self.results_path = ensure_folder(out) / RESULTS_FILE
        self.spool = ensure_folder(Path(out) / SPOOL_FOLDER)
        self._pending: dict[int, Received] = {}  # acknowledged, no results row yet
        self.queue: queue.Queue[Received | None] = queue.Queue(limits.queue_size)
        self._budget = _ByteBudget(limits.queued_bytes)
        self.outbox: queue.Queue[tuple | None] = queue.Queue(limits.queue_size)  # classified, to be answered
        self.counts = {
            "received": 0,
            "classified": 0,
            "refused": 0,
            "failed": 0,
            "rejected": 0,
            "sent": 0,
            "send_failed": 0,
        }
        self._server = self._ae = self._worker = None
        self._spooled = itertools.count()
        self._senders: list[tuple[threading.Thread, Sender | StowSender]] = []
        self._results = None
        self._lock = threading.Lock()  # counts and the results file, shared by the worker and the senders
        self._stopped = threading.Event()
        self._peer_lock = threading.Lock()  # one association request judged against its peer's share at a time
        self._reaper: threading.Thread | None = None
        self._to_files = False  # this node holds pynetdicom's receive-to-file setting on

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Bind and serve in background threads; returns at once (``self.port`` is the bound port)."""
        from pynetdicom import AE, evt

        ae = AE(ae_title=self.ae_title)
        ae.maximum_associations = self.limits.max_associations
        ae.acse_timeout, ae.dimse_timeout = self.limits.acse_timeout, self.limits.dimse_timeout
        ae.network_timeout = self.limits.network_timeout
        ae.maximum_pdu_size = self.limits.max_pdu
        if self.allow:
            ae.require_calling_aet = self.allow
        ae.add_supported_context(VERIFICATION)
        syntaxes = accepted_transfer_syntaxes()
        for sop in ACCEPTED_SOP_CLASSES:
            ae.add_supported_context(sop, syntaxes)
        handlers = [
            (evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_CONN_OPEN, self._on_connection),
            (evt.EVT_CONN_CLOSE, self._on_closed),
            (evt.EVT_PDU_RECV, self._on_pdu),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REQUESTED, self._on_requested),
        ]
        self._results = open(self.results_path, "a", encoding="utf-8", buffering=1)
        self._worker = threading.Thread(target=self._work, name="pneumoscan-classify", daemon=True)
        self._worker.start()
        for n in range(self.limits.send_associations if self.send_to else 0):
            sender = make_sender(self.send_to, self.ae_title, self.limits)
            thread = threading.Thread(target=self._send_loop, args=(sender,), name=f"pneumoscan-send-{n}", daemon=True)
            thread.start()
            self._senders.append((thread, sender))
        self._recover_spool()
        self._ae = ae
        self._reaper = threading.Thread(target=self._end_idle_associations, name="pneumoscan-idle", daemon=True)
        self._reaper.start()
        _receive_to_files(True)
        self._to_files = True
        try:
            self._server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        except OSError as exc:
            self._finish_threads()
            raise ConfigError(f"cannot listen on {self.host}:{self.port} ({exc.strerror or exc})") from None
        self.port = self._server.server_address[1]
        LOG.info("listening as %s on %s:%d", self.ae_title, self.host, self.port)

    def stop(self) -> None:
        """Stop accepting, give open associations ``drain_timeout`` to close, then classify and answer every image
        already acknowledged; within ``stop_timeout`` every one has its results row (not sent, and why, where the
        destination did not answer in time)."""
        if self._server is None or self._stopped.is_set():
            return
        self._stopped.set()
        deadline = time.monotonic() + self.limits.stop_timeout
        self._server.shutdown()  # no new associations; open ones are refused new stores
        grace = time.monotonic() + min(self.limits.drain_timeout, self.limits.stop_timeout / 3)
        while any(a.is_established for a in self._ae.active_associations) and time.monotonic() < grace:
            time.sleep(0.05)
        self._ae.shutdown()  # aborts what is still open after the grace period
        self._finish_threads(deadline)

    def _finish_threads(self, deadline: float | None = None) -> None:
        """Classify what is queued and answer what is classified until ``deadline``; then every acknowledged image
        still without a row gets one saying why, and the file is closed. Threads still waiting on the destination
        are left behind (they are daemons and write nothing more)."""
        deadline = deadline or time.monotonic() + self.limits.stop_timeout
        self._stopped.set()
        self._reaper.join()
        ends = [(self.queue, self._worker)] + [(self.outbox, thread) for thread, _ in self._senders]
        for box, thread in ends:
            try:
                box.put(None, timeout=max(0.0, deadline - time.monotonic()))
            except queue.Full:
                break
            if box is self.queue:
                thread.join(max(0.0, deadline - time.monotonic()))
        for thread, sender in self._senders:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                sender.abandon()  # its threads must not keep the process from exiting
            else:
                sender.close()
        self._answer_the_rest()
        with self._lock:
            self._results.close()
        if self._to_files:
            self._to_files = False
            _receive_to_files(False)

    def _answer_the_rest(self) -> None:
        """A row for every acknowledged image still without one when the node must stop."""
        with self._lock:
            left = list(self._pending.values())
        for item in left:
            if item.record is not None:
                record = dict(item.record)
                record["send_error"] = (
                    f"not sent: the node stopped after {self.limits.stop_timeout:.0f} s with the destination "
                    "not answering"
                )
                self._count("send_failed")
                self._finish(item, record)
            else:
                failure = Prediction(item.calling_ae, error="not classified before the node stopped")
                record = failure.to_dict() | {"spooled": str(item.spool), "calling_ae": item.calling_ae}
                self._finish(item, record, keep_spool=True)  # classified at the next start

    def serve_forever(self) -> None:
        """Start, then serve until SIGTERM or SIGINT; images in flight are finished before returning."""
        stop = threading.Event()
        previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            stop.wait()
        finally:
            self.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)

    # -- network events ----------------------------------------------------------------------------------------
    def _on_connection(self, event) -> None:
        """Every read of a PDU is bounded: pynetdicom reads whatever length a PDU header claims. A PDU over the
        limit, or a dataset over ``max_dataset_bytes``, closes the connection at once (the association ends)."""
        sock = event.assoc.dul.socket
        read, limit = sock.recv, max(self.limits.max_pdu, 2**20) + 6  # an A-ASSOCIATE-RQ may exceed the max PDU
        state = event.assoc._pneumoscan = {"dataset": 0, "over": False, "active": time.monotonic(), "storing": 0}

        def bounded_recv(nr_bytes: int) -> bytearray:
            if nr_bytes > limit or state["over"]:
                what = "a dataset over the limit" if state["over"] else f"a PDU of {nr_bytes} bytes, over the limit"
                LOG.warning("%s sent %s: connection closed", event.assoc.requestor.address, what)
                sock.close()
                return bytearray()
            return read(nr_bytes)

        sock.recv = bounded_recv

    @staticmethod
    def _on_closed(event) -> None:
        """A connection closed in the middle of a dataset (aborted, over the size limit) leaves pynetdicom's
        temporary file of it behind: remove it (a complete one is removed by pynetdicom after the handler)."""
        message = getattr(getattr(event.assoc, "dimse", None), "message", None)
        partial = getattr(message, "_data_set_file", None)
        if partial is None:
            return
        message._data_set_file = message._data_set_path = None
        try:
            partial.close()
            os.unlink(partial.name)
        except OSError:
            pass

    def _on_pdu(self, event) -> None:
        """Counts the bytes of the dataset being received; one over ``max_dataset_bytes`` aborts the association."""
        state = getattr(event.assoc, "_pneumoscan", None)
        items = getattr(event.pdu, "presentation_data_value_items", None)
        if state is None or not items:
            return
        for item in items:
            value = item.presentation_data_value
            if value and not value[0] & 1:  # dataset fragment (not command)
                state["active"] = time.monotonic()  # a C-STORE arriving: the association is in use
                state["dataset"] += len(value) - 1
                if state["dataset"] > self.limits.max_dataset_bytes:
                    state["over"] = True
                    LOG.warning(
                        "%s: dataset over %d bytes, association aborted",
                        event.assoc.requestor.ae_title,
                        self.limits.max_dataset_bytes,
                    )
                if value[0] & 2:
                    state["dataset"] = 0

    def _on_requested(self, event) -> None:
        """One peer (calling AE title and address) holds at most ``peer_share`` associations: one more is rejected
        (transient, local limit exceeded), so that no single sender can keep every slot."""
        assoc = event.assoc
        peer = (str(assoc.requestor.primitive.calling_ae_title).strip(), assoc.requestor.address)
        with self._peer_lock:
            held = sum(1 for a in self._ae.active_associations if a is not assoc and _peer_of(a) == peer)
            if held >= self.limits.peer_share:
                LOG.warning(
                    "association from %s (%s) rejected: it already holds %d, its share of %d",
                    *peer,
                    held,
                    self.limits.max_associations,
                )
                assoc.acse.send_reject(0x02, 0x03, 0x02)  # rejected transient, presentation: local limit exceeded
                return
            assoc._pneumoscan_peer = peer

    def _end_idle_associations(self) -> None:
        """End (A-ABORT) every association that has received no C-STORE for ``network_timeout`` seconds, however
        often it sends C-ECHOs: an idle association must not keep a slot."""
        period = min(1.0, self.limits.network_timeout / 4)
        while not self._stopped.wait(period):
            now = time.monotonic()
            for assoc in self._ae.active_associations:
                state = getattr(assoc, "_pneumoscan", None)
                if not state or state["storing"] or not assoc.is_established:
                    continue
                if now - state["active"] > self.limits.network_timeout:
                    LOG.warning(
                        "association from %s (%s) ended: no C-STORE for %.0f s",
                        assoc.requestor.ae_title,
                        assoc.requestor.address,
                        self.limits.network_timeout,
                    )
                    state["active"] = now  # aborted once; do not log it again while it closes
                    assoc.abort(block=False)

    def _on_rejected(self, event) -> None:
        LOG.warning("association from %s (%s) rejected", event.assoc.requestor.ae_title, event.assoc.requestor.address)

    def _on_accepted(self, event) -> None:
        """Say so when a peer offered nothing this node takes (senders often offer every SOP class at once)."""
        if event.assoc.accepted_contexts:
            return
        refused = sorted({getattr(UID(cx.abstract_syntax), "name", "") for cx in event.assoc.rejected_contexts})
        more = f" and {len(refused) - 3} more" if len(refused) > 3 else ""
        LOG.warning(
            "%s offered no CR or DX image storage (%s%s): nothing accepted",
            event.assoc.requestor.ae_title,
            ", ".join(refused[:3]),
            more,
        )

    def _on_store(self, event) -> int:
        state = getattr(event.assoc, "_pneumoscan", None) or {"storing": 0}
        state["storing"] += 1  # not idle while it waits for room in the queue
        try:
            return self._store(event)
        finally:
            state["storing"] -= 1
            state["active"] = time.monotonic()

    def _store(self, event) -> int:
        if self._stopped.is_set():
            return STATUS_OUT_OF_RESOURCES
        try:
            arrived = _arrived(event)
            size = arrived.stat().st_size if isinstance(arrived, Path) else len(arrived)
        except Exception:  # noqa: BLE001 - a dataset we cannot even hold is the sender's problem, not a crash
            LOG.exception("C-STORE could not be read")
            return STATUS_CANNOT_UNDERSTAND
        refusal = self._refusal(arrived)
        if refusal:
            LOG.warning("C-STORE from %s rejected: %s", event.assoc.requestor.ae_title, refusal)
            self._count("rejected")
            return STATUS_NOT_THIS_SOP_CLASS
        item = Received(event.assoc.requestor.ae_title, size=size, held=size)
        if not self._budget.take(item.held, self.limits.queue_wait):
            LOG.warning("queue full: C-STORE from %s answered out of resources", item.calling_ae)
            return STATUS_OUT_OF_RESOURCES
        try:
            item.spool = self._write_spool(arrived, item.calling_ae)
        except OSError as exc:
            self._release(item)
            LOG.warning("cannot spool a C-STORE from %s (%s): answered out of resources", item.calling_ae, exc)
            return STATUS_OUT_OF_RESOURCES
        with self._lock:
            self._pending[item.key] = item
        try:
            self.queue.put(item, timeout=self.limits.queue_wait)
        except queue.Full:
            with self._lock:
                self._pending.pop(item.key, None)
            item.spool.unlink(missing_ok=True)
            self._release(item)
            LOG.warning("queue full: C-STORE from %s answered out of resources", item.calling_ae)
            return STATUS_OUT_OF_RESOURCES
        self._count("received")
        return STATUS_SUCCESS  # acknowledged only now: the image is on disk and will have its row

    # -- the spool ---------------------------------------------------------------------------------------------
    def _write_spool(self, arrived: Path | bytes, calling_ae: str) -> Path:
        """Put one received image in the spool and fsync it (file and folder) before it is acknowledged: the file
        pynetdicom received it into is moved there (copied, where ``TMPDIR`` is on another file system)."""
        name = f"{time.time_ns()}-{next(self._spooled)}-{calling_ae.encode().hex()}.dcm"
        part = self.spool / (name + ".part")
        try:
            if isinstance(arrived, Path):
                try:
                    os.replace(arrived, part)
                except OSError:
                    shutil.copyfile(arrived, part)
                fd = os.open(part, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            else:
                with open(part, "wb") as file:
                    file.write(arrived)
                    file.flush()
                    os.fsync(file.fileno())
        except OSError:
            part.unlink(missing_ok=True)
            raise
        os.replace(part, self.spool / name)
        _fsync_folder(self.spool)
        return self.spool / name

    def _recover_spool(self) -> None:
        """Queue every image a previous run acknowledged but did not answer (it stopped, or was killed)."""
        for part in self.spool.glob("*.part"):
            part.unlink(missing_ok=True)  # never acknowledged
        found = sorted(self.spool.glob("*.dcm"))
        if found:
            LOG.warning("recovering %d acknowledged image(s) from %s", len(found), self.spool)
        for path in found:
            size = path.stat().st_size
            item = Received(_spooled_sender(path), size=size, held=size, spool=path, recovered=True)
            item.received_at = _spooled_time(path) or item.received_at
            self._budget.take(item.held, None)
            with self._lock:
                self._pending[item.key] = item
            self.queue.put(item)
            self._count("received")

    @staticmethod
    def _refusal(arrived: Path | bytes) -> str | None:
        """Why a received dataset is rejected with a failure status (no row), or None to accept it (its header
        alone is read: no pixel data, and from a file no value over 64 KiB)."""
        import pydicom

        from pneumoscan.io.dicom_sr import HEADER_DEFER

        on_disk = isinstance(arrived, Path)
        source, defer = (arrived, HEADER_DEFER) if on_disk else (io.BytesIO(arrived), None)
        try:
            header = pydicom.dcmread(source, stop_before_pixels=True, force=True, defer_size=defer)
        except Exception as exc:  # noqa: BLE001 - an unreadable header is the sender's error
            return f"not a readable DICOM dataset ({str(exc)[:150]})"
        return why_not_a_radiograph(header)

    # -- classification ----------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < self.limits.batch_size:
                try:
                    nxt = self.queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)  # finish this batch, then stop
                    break
                batch.append(nxt)
            try:
                self._answer_batch(batch)
            except Exception as exc:  # noqa: BLE001 - nothing one batch does may stop the node
                LOG.exception("batch of %d images failed", len(batch))
                for item in batch:
                    failure = Prediction(item.calling_ae, error=f"internal error ({type(exc).__name__})")
                    self._finish(item, self._record(item, None, failure))

    def _answer_batch(self, batch: list[Received]) -> None:
        answers = answer_images(self.classifier, [i.spool for i in batch], names=[i.calling_ae for i in batch])
        for item, (source, result) in zip(batch, answers):
            record = item.record = self._record(item, source, result)
            if self._senders and source is not None:
                if not (self.send_cam and result.ok):
                    self._release(item)  # the pixels are no longer needed: the outbox holds none it will not use
                self.outbox.put((item, source, result, record))
            else:
                self._finish(item, record)

    def _send_loop(self, sender: Sender | StowSender) -> None:
        """One of ``send_associations`` threads: build each report and C-STORE it on this thread's association
        (a PACS answers each store after committing it, so several associations keep several stores in flight)."""
        while (job := self.outbox.get()) is not None:
            item, source, result, record = job
            if item.key not in self._pending:
                continue  # the node stopped and answered it already
            try:
                self._send(sender, source, result, item, record)
            except Exception as exc:  # noqa: BLE001 - one image's failure is its own row
                LOG.exception("answering %s failed", record.get("sop_instance_uid"))
                record["send_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                self._count("send_failed")
            self._finish(item, record)

    def _count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def _release(self, item: Received) -> None:
        if item.held:
            self._budget.give(item.held)
        item.held = 0

    def _finish(self, item: Received, record: dict, keep_spool: bool = False) -> None:
        """Write the image's one results row (fsynced), then drop its spooled copy; a second call is a no-op."""
        self._release(item)
        record["seconds"] = round(time.monotonic() - item.received, 4)
        if item.recovered:
            record["recovered"] = True
        with self._lock:
            if self._pending.pop(item.key, None) is None:
                return
            self._results.write(json.dumps(record) + "\n")
            self._results.flush()
            os.fsync(self._results.fileno())
        if item.spool is not None and not keep_spool:
            item.spool.unlink(missing_ok=True)
        LOG.info("%s", _summary(record))

    def _record(self, item: Received, source, result: Prediction) -> dict:
        record = result.to_dict()
        if source is not None:
            record.update(
                study_instance_uid=str(source.StudyInstanceUID),
                series_instance_uid=str(source.SeriesInstanceUID),
                sop_instance_uid=str(source.SOPInstanceUID),
            )
        record.update(calling_ae=item.calling_ae, received=item.received_at)
        self._count("classified" if result.ok else "refused" if source is not None else "failed")
        return record

    def _send(self, sender: Sender | StowSender, source, result: Prediction, item: Received, record: dict) -> None:
        from pneumoscan.io.dicom_sr import build_report

        report = build_report(source, result, self.model)
        try:
            sender.send(report)
        except OSError as exc:
            self._count("send_failed")
            record["send_error"] = str(exc)
            return
        self._count("sent")
        record["sr_instance_uid"] = str(report.SOPInstanceUID)
        if self.send_cam and result.ok:
            from pneumoscan.io.dicom_sr import build_cam_image

            overlay = self.classifier.explain(_SpooledImage(item.spool, record["path"])).overlay()
            cam = build_cam_image(source, np.asarray(overlay), self.model)
            sender.send(cam)
            record["cam_instance_uid"] = str(cam.SOPInstanceUID)


def _arrived(event) -> Path | bytes:
    """The received dataset: the file pynetdicom wrote it to as it arrived, or (where the process-wide setting
    was turned off by someone else) its bytes in memory, with the file meta information."""
    try:
        path = event.dataset_path
    except AttributeError:
        path = None
    return Path(path) if path is not None else event.encoded_dataset(include_meta=True)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _spooled_sender(path: Path) -> str:
    """The calling AE title a spooled image's name records (``NS-N-HEX.dcm``)."""
    try:
        return bytes.fromhex(path.stem.rsplit("-", 1)[-1]).decode("ascii") or "spool"
    except (ValueError, UnicodeDecodeError):
        return "spool"


def _spooled_time(path: Path) -> str | None:
    try:
        seconds = int(path.stem.split("-", 1)[0]) / 1e9
    except ValueError:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds")


def _peer_of(assoc) -> tuple[str, str] | None:
    """The (calling AE title, address) an association was counted against, while it is open."""
    if assoc.is_aborted or assoc.is_released or assoc.is_rejected:
        return None
    return getattr(assoc, "_pneumoscan_peer", None)


def _summary(record: dict) -> str:
    what = record.get("label") or f"refused: {record.get('error')}"
    if "probability" in record:
        what += f" {record['probability']:.4f}"
    if "sr_instance_uid" in record:
        what += " -> SR sent"
    elif "send_error" in record:
        what += f" -> not sent: {record['send_error']}"
    return f"{record['path']}: {what}"


def answer_images(classifier: Classifier, files: Sequence[bytes | Path], names: Sequence[str] | None = None) -> list:
    """``(header, Prediction)`` per DICOM file (its bytes or its path: a path is read only while it is decoded),
    classified together; the header is None (and the prediction an error) for a file whose header lacks the UIDs
    a report needs."""
    from pneumoscan.io.dicom_sr import read_header

    headers, sources = [], []
    for n, data in enumerate(files):
        who = names[n] if names else "dicom"
        try:
            header = read_header(data, who)
            name = f"{who}/{header.SOPInstanceUID}"
        except ImageError as exc:
            header, name = None, who
            headers.append((None, Prediction(name, error=exc.reason)))
            sources.append(None)
            continue
        headers.append((header, None))
        sources.append(_SpooledImage(data, name) if isinstance(data, Path) else _NamedBytes(data, name))
    todo = [s for s in sources if s is not None]
    predicted = iter(classifier.predict(todo, batch_size=max(1, len(todo)))) if todo else iter(())
    return [(h, p) if p is not None else (h, next(predicted)) for h, p in headers]
