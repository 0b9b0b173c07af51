"""``pneumoscan serve``: a FastAPI service and a one-page UI over one loaded :class:`Classifier`.

The model is loaded once; decoding and inference run in a thread pool sized to the cores
(ONNX Runtime and Pillow release the GIL), so the event loop never blocks. Uploads are
refused with 413 from their Content-Length before the body is read, and are read into
memory only up to the limit: they are never written anywhere that could serve or keep them.

Clients are hostile until proven otherwise: a request head must arrive within ``header_timeout``
seconds; a body may not stall for ``body_timeout`` and must be complete within ``body_deadline``; open
connections are capped, overall and per client address, and at the cap a new connection replaces the
one that has waited longest for a request head (so /healthz keeps answering a flood); every response
carries a Content-Security-Policy that allows no inline script and nothing from other origins; no
redirect is built from the client's Host header; the API docs are served from this package, offline.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import FastAPI, HTTPException, UploadFile
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from uvicorn.protocols.http.h11_impl import H11Protocol

from pneumoscan.core.errors import ConfigError, ImageError
from pneumoscan.core.options import ServeOptions
from pneumoscan.core.package import __version__
from pneumoscan.core.settings import DECLARED, declared
from pneumoscan.core.text import printable
from pneumoscan.inference.classifier import Classifier
from pneumoscan.inference.result import field_list
from pneumoscan.model.card import GENERALISATION_NOTE, model_card

STATIC = Path(__file__).parent / "static"
# the defaults declared with serve's options (ServeOptions), as the protocol and guard use them
DEFAULT_MAX_UPLOAD = int(ServeOptions.max_upload_mb * 2**20)
DEFAULT_BODY_TIMEOUT = ServeOptions.body_timeout  # seconds a client may stay silent while sending a request body
DEFAULT_BODY_DEADLINE = ServeOptions.body_deadline  # seconds a whole request body may take
DEFAULT_HEADER_TIMEOUT = ServeOptions.header_timeout  # seconds a client has to send a complete request head
DEFAULT_MAX_CONNECTIONS = 1000
CLIENT_SHARE = 10  # by default one client address may hold a tenth of the connections
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around the file
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
DOCS_ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css"}  # all /docs-assets serves
# Swagger UI sets some styles inline; its scripts are still ours alone (static/docs.js), never inline.
DOCS_CSP = CSP.replace("style-src 'self'", "style-src 'self' 'unsafe-inline'")
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


class PredictResponse(BaseModel):
    """The prediction record (``output.FIELDS``, documented here field by field) and the model's name;
    a field added to the record passes through before it is documented here (extra fields allowed)."""

    model_config = ConfigDict(extra="allow")
    path: str = Field(description="the uploaded file's name")
    probability: float = Field(description="calibrated probability of PNEUMONIA")
    label: str = Field(description="NORMAL or PNEUMONIA, by the model's operating threshold")
    threshold: float = Field(description="operating threshold (where it was fitted: GET /v1/model)")
    model: str
    version: str
    subtype: str | None = Field(None, description="bacterial or viral, for PNEUMONIA (bundles with the head)")
    viral_probability: float | None = Field(None, description="calibrated probability that the pneumonia is viral")
    gate_score: float | None = Field(None, description="the input gate's score (higher: less like a chest X-ray)")
    gate_limit: float | None = Field(None, description="scores above this limit are refused (422)")
    gate: str | None = Field(None, description="'off' when predicted with ?gate=false")
    warnings: list[str] | None = Field(None, description="a degraded film: what the input gate noticed")
    cam: str | None = Field(None, description="Grad-CAM overlay, PNG, base64 (with ?cam=true)")
    image: str | None = Field(None, description="the X-ray as the model read it, PNG, base64 (with ?cam=true)")


class RecordField(BaseModel):
    name: str
    label: str = Field(description="how the page names it")
    digits: int | None = Field(None, description="decimals a number is shown with")


class Health(BaseModel):
    status: str
    model: str
    engine: str


class Capabilities(BaseModel):
    """What the loaded model does beyond NORMAL or PNEUMONIA, asked of the loaded classifier (an ensemble's
    gate and subtype head are its primary member's, not files of its own config)."""

    input_gate: bool = Field(description="images that do not look like chest X-rays are refused (422)")
    subtype: bool = Field(description="PNEUMONIA results also say bacterial or viral")


class ModelInfo(BaseModel):
    name: str
    version: str
    engine: str
    operating_point: str = Field(description="where the threshold and temperature come from")
    generalisation_note: str = Field(description="what the validation and test numbers predict for a new hospital")
    capabilities: Capabilities
    config: dict
    metrics: dict
    model_card: str = Field(description="the model card, generated from the checked config and metrics")


def _png_base64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG", optimize=False)
    return base64.b64encode(buf.getvalue()).decode()


class _UploadGuard:
    """ASGI middleware for request bodies: refuse a declared Content-Length over the limit with 413
    before reading anything, stop a body without one (chunked) once it passes the limit, and
    answer 408 when a body stalls for ``seconds`` or is not complete ``deadline`` seconds after its
    request head (a client trickling a byte now and then is not stalled, but it is too slow)."""

    class _Refused(BaseException):  # not Exception: the form parser would turn it into a 400
        def __init__(self, status: int, detail: str):
            self.status, self.detail = status, detail

    def __init__(self, app, max_bytes: int, seconds: float, deadline: float = DEFAULT_BODY_DEADLINE):
        self.app, self.max_bytes, self.seconds, self.deadline = app, max_bytes, seconds, deadline

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if scope["method"] == "POST" and length.isdigit() and int(length) > self.max_bytes + MULTIPART_OVERHEAD:
            detail = f"upload is {int(length) / 2**20:.1f} MB, over the {self.max_bytes / 2**20:.0f} MB limit"
            return await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)
        started, received = False, 0
        limit = self.max_bytes + MULTIPART_OVERHEAD
        loop = asyncio.get_running_loop()
        due = loop.time() + self.deadline

        async def timed_receive():
            nonlocal received
            left = due - loop.time()
            try:
                if left <= 0:
                    raise asyncio.TimeoutError
                message = await asyncio.wait_for(receive(), min(self.seconds, left))
            except asyncio.TimeoutError:
                if due - loop.time() <= 0:
                    raise self._Refused(408, f"request body not complete within {self.deadline:g} s") from None
                raise self._Refused(408, f"request body stalled for {self.seconds:g} s") from None
            received += len(message.get("body", b""))
            if received > limit:
                raise self._Refused(413, f"upload is over the {self.max_bytes / 2**20:.0f} MB limit")
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, timed_receive, tracked_send)
        except self._Refused as refusal:
            if not started:
                await JSONResponse({"detail": refusal.detail}, status_code=refusal.status)(scope, receive, send)


class _SecurityHeaders:
    """ASGI middleware: a Content-Security-Policy and the usual hardening headers on every response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        policy = (DOCS_CSP if scope["path"] == "/docs" else CSP).encode()

        async def with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"content-security-policy", policy)]
                message["headers"] += SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, with_headers)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for the request head and caps on connections.

    uvicorn's keep-alive timeout is reset by every byte received, so a client that trickles a header
    a byte at a time, or never finishes it, would hold its connection forever. Here a connection that
    has not delivered a complete request head ``header_timeout`` seconds after it opened (or after the
    previous response) is closed. One client address may hold ``max_per_client`` connections; more are
    closed at once. At ``max_connections`` in all, a new connection replaces the one that has waited
    longest for a request head (idle or half-open); only when every connection is busy with a request
    is the new one closed."""

    header_timeout = DEFAULT_HEADER_TIMEOUT
    max_connections = DEFAULT_MAX_CONNECTIONS
    max_per_client = DEFAULT_MAX_CONNECTIONS // CLIENT_SHARE
    clients: Counter = Counter()  # open connections per client address (one Counter per protocol_class)
    _head_deadline = None
    _client = None
    _waiting_since = 0.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        client = _client_address(transport)
        if self.clients[client] >= self.max_per_client:
            transport.close()
            return
        if sum(self.clients.values()) >= self.max_connections and not self._evict_longest_waiting():
            transport.close()
            return
        self._client = client
        self.clients[client] += 1
        self._arm_head_deadline()

    def _evict_longest_waiting(self) -> bool:
        """Close the connection that has waited longest for a request head; False if none is waiting."""
        waiting = [
            c
            for c in self.connections
            if isinstance(c, GuardedH11Protocol) and c is not self and c._client is not None and c._waiting_for_head()
        ]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda c: c._waiting_since)
        oldest._cancel_head_deadline()
        oldest.transport.close()
        oldest._forget_client()  # counted out now: its connection_lost comes on a later loop turn
        return True

    def _forget_client(self) -> None:
        if self._client is not None:
            self.clients[self._client] -= 1
            if self.clients[self._client] <= 0:
                del self.clients[self._client]
            self._client = None

    def _arm_head_deadline(self) -> None:
        self._cancel_head_deadline()
        self._waiting_since = time.monotonic()
        self._head_deadline = self.loop.call_later(self.header_timeout, self._head_deadline_passed)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _waiting_for_head(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _head_deadline_passed(self) -> None:
        self._head_deadline = None
        if self._waiting_for_head() and not self.transport.is_closing():
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if not self._waiting_for_head():  # a complete head arrived: the body has its own timeout
            self._cancel_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._waiting_for_head() and not self.transport.is_closing():
            self._arm_head_deadline()

    def connection_lost(self, exc) -> None:
        self._cancel_head_deadline()
        self._forget_client()
        super().connection_lost(exc)


def _client_address(transport) -> str:
    """The peer's address without its port: the unit that gets a share of the connections."""
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, (tuple, list)) and peer else str(peer or "")


def default_max_connections() -> int:
    """DEFAULT_MAX_CONNECTIONS, or fewer where the process may not open that many files (with room to spare)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return DEFAULT_MAX_CONNECTIONS
    return max(16, min(DEFAULT_MAX_CONNECTIONS, soft - 128))


def protocol_class(
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    max_connections: int | None = None,
    max_per_client: int | None = None,
) -> type:
    """A :class:`GuardedH11Protocol` with these limits, for ``uvicorn.Config(http=...)``; by default one
    client address may hold a tenth of the connections (at least one)."""
    total = max_connections or default_max_connections()
    per_client = max_per_client or max(1, total // CLIENT_SHARE)
    limits = {"header_timeout": header_timeout, "max_connections": total, "max_per_client": per_client}
    return type("PneumoscanHTTP", (GuardedH11Protocol,), {**limits, "clients": Counter()})


@declared(ServeOptions, "model", "engine", "int8", "fp32", "workers", "cors_origins", "body_timeout", "body_deadline")
def create_app(
    model: str | os.PathLike | None = DECLARED,
    *,
    engine: str = DECLARED,
    int8: bool = DECLARED,
    fp32: bool = DECLARED,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
    workers: int | None = DECLARED,
    cors_origins: list[str] | None = DECLARED,
    body_timeout: float = DECLARED,
    body_deadline: float = DECLARED,
    classifier: Classifier | None = None,
) -> FastAPI:
    """The application (options as :func:`serve`'s, the upload limit in bytes); ``classifier`` lets tests
    and embedders pass one already loaded."""
    clf = classifier or Classifier.load(model, engine=engine, int8=int8, fp32=fp32)
    pool = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2, thread_name_prefix="pneumoscan")
    app = FastAPI(
        title="pneumoscan",
        version=__version__,
        description="Pneumonia detection on chest X-rays. Research software, not a medical device.",
        docs_url=None,  # FastAPI's pages load Swagger UI from a CDN; ours serves it from this package
        redoc_url=None,
    )
    app.router.redirect_slashes = False  # a redirect would echo the client's Host header
    app.state.classifier = clf
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"])

    def run_prediction(data: bytes, name: str, cam: bool, gate: bool) -> dict:
        source = io.BytesIO(data)
        source.name = name
        result = clf.predict([source], errors="raise", gate=gate)[0]
        if not result.ok:  # refused by the input gate
            raise HTTPException(422, f"{name}: {result.error}")
        out = {**result.to_dict(), "model": clf.bundle.name, "version": str(clf.bundle.config.get("version", ""))}
        if cam:
            source.seek(0)
            explanation = clf.explain(source)
            out["cam"] = _png_base64(explanation.overlay())
            out["image"] = _png_base64(Image.fromarray(explanation.image))
        return out

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        summary="Classify one X-ray (JPEG, PNG or DICOM)",
        responses={
            413: {"description": "upload too large"},
            415: {"description": "not an image: neither JPEG, PNG nor DICOM by its content"},
            422: {
                "description": "an image that cannot be used (truncated, too small, a DICOM file whose pixels "
                "cannot be decoded), or not a chest X-ray (the input gate)"
            },
        },
    )
    async def predict(file: UploadFile, cam: bool = False, gate: bool = True):
        data = await file.read(max_upload_bytes + 1)
        name = file.filename or "upload"
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"{name}: upload is over the {max_upload_bytes / 2**20:.0f} MB limit")
        if not data:
            raise HTTPException(422, f"{name}: file is empty")
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, run_prediction, data, name, cam, gate)
        except ImageError as exc:
            raise HTTPException(exc.http_status, str(exc)) from None

    @app.get("/v1/fields", response_model=list[RecordField], summary="The prediction record's fields, in order")
    async def record_fields():
        return field_list()

    @app.get("/healthz", response_model=Health)
    async def healthz():
        return Health(status="ok", model=clf.bundle.name, engine=clf.engine.name)

    # The card is made from the config and metrics that load_bundle checked and bounded, once: the
    # bundle's MODEL_CARD.md file is never read here (it could be a link to a private file, or huge).
    card = model_card(clf.bundle)

    @app.get("/v1/model", response_model=ModelInfo)
    async def model_info():
        return ModelInfo(
            name=clf.bundle.name,
            version=str(clf.bundle.config.get("version", "")),
            engine=clf.engine.name,
            operating_point=clf.bundle.operating_point_source,
            generalisation_note=GENERALISATION_NOTE,
            capabilities=Capabilities(input_gate=clf.has_gate, subtype=clf.has_subtype),
            config=clf.bundle.config,
            metrics=clf.bundle.metrics,
            model_card=card,
        )

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return FileResponse(STATIC / "docs.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/docs-assets/{name}", include_in_schema=False)
    async def docs_asset(name: str):
        if name not in DOCS_ASSETS:
            raise HTTPException(404, "Not Found")
        return FileResponse(_swagger_ui_path() / name, media_type=DOCS_ASSETS[name])

    app.add_middleware(_UploadGuard, max_bytes=max_upload_bytes, seconds=body_timeout, deadline=body_deadline)
    app.add_middleware(_SecurityHeaders)
    app.router.on_shutdown.append(lambda: pool.shutdown(wait=False))
    return app


def _swagger_ui_path() -> Path:
    """Swagger UI 5 (which renders OpenAPI 3.1, the version FastAPI writes), as the fastapi-swagger package
    ships it: the two files the page needs, served from this install, offline."""
    import fastapi_swagger

    return Path(fastapi_swagger.__file__).parent / "resources"


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, or one line saying why not (a busy port, an address not on this machine)."""
    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        if sock is not None:
            sock.close()
        raise ConfigError(f"{host}:{port}: cannot listen ({exc.strerror or exc})") from None
    return sock


def make_server(
    app,
    sock: socket.socket,
    *,
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    max_connections: int | None = None,
    max_per_client: int | None = None,
):
    """A uvicorn server for ``app`` on ``sock`` with the guarded protocol; ``server.run(sockets=[sock])``."""
    import uvicorn

    config = uvicorn.Config(
        app,
        log_level="warning",
        timeout_keep_alive=5,
        http=protocol_class(header_timeout, max_connections, max_per_client),
        server_header=False,
    )
    return uvicorn.Server(config)


@declared(ServeOptions, *ServeOptions.__dataclass_fields__)
def serve(
    model: str | os.PathLike | None = DECLARED,
    host: str = DECLARED,
    port: int = DECLARED,
    *,
    engine: str = DECLARED,
    int8: bool = DECLARED,
    fp32: bool = DECLARED,
    max_upload_mb: float = DECLARED,
    body_timeout: float = DECLARED,
    body_deadline: float = DECLARED,
    header_timeout: float = DECLARED,
    max_connections: int | None = DECLARED,
    max_per_client: int | None = DECLARED,
    workers: int | None = DECLARED,
    cors_origins: list[str] | None = DECLARED,
) -> None:
    """``pneumoscan serve``: the service on ``host``:``port`` until stopped (each option as the CLI's)."""
    # the model is loaded and checked before the port is bound: a refused bundle leaves no socket behind
    app = create_app(
        model,
        engine=engine,
        int8=int8,
        fp32=fp32,
        max_upload_bytes=int(max_upload_mb * 2**20),
        workers=workers,
        cors_origins=cors_origins,
        body_timeout=body_timeout,
        body_deadline=body_deadline,
    )
    sock = listen(host, port)
    print(f"pneumoscan serving {printable(app.state.classifier.bundle.name)} on http://{host}:{port}/")
    server = make_server(
        app, sock, header_timeout=header_timeout, max_connections=max_connections, max_per_client=max_per_client
    )
    server.run(sockets=[sock])
