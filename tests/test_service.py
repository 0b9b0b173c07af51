import base64
import io
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import VAL_FULLRES
from corpus import REAL, bomb_png, dicom, real_grey
from fastapi.testclient import TestClient
from PIL import Image

from pneumoscan import Classifier
from pneumoscan.serving.service import create_app, listen, make_server


@pytest.fixture(scope="module")
def app(trained_bundle):
    return create_app(classifier=Classifier.load(trained_bundle.path, engine="torch"), max_upload_bytes=2 * 2**20)


@pytest.fixture(scope="module")
def client(app):
    return TestClient(app)


def _post(client, name, data, **params):
    return client.post("/v1/predict", files={"file": (name, data)}, params=params)


def test_predict_returns_the_contract(client, app):
    r = _post(client, "x.jpeg", REAL.read_bytes())
    assert r.status_code == 200
    body = r.json()
    assert {"path", "probability", "label", "threshold", "model", "version"} <= set(body)
    assert body["path"] == "x.jpeg" and body["label"] in ("NORMAL", "PNEUMONIA") and body["cam"] is None
    expected = app.state.classifier.predict_one(REAL).probability
    assert body["probability"] == pytest.approx(expected, abs=1e-6)


def test_predict_with_cam_and_dicom(client):
    r = _post(client, "x.dcm", dicom(real_grey()), cam="true")
    assert r.status_code == 200
    overlay = Image.open(io.BytesIO(base64.b64decode(r.json()["cam"])))
    assert overlay.mode == "RGB" and overlay.width > 224 and overlay.height > 224  # label, probability, colour bar


@pytest.mark.parametrize(
    "name,data,status,fragment",
    [
        ("notes.jpeg", b"hello" * 100, 415, "not a recognised image"),
        ("empty.png", b"", 422, "empty"),
        ("cut.jpeg", REAL.read_bytes()[:300], 422, "cut.jpeg"),
        ("bomb.png", bomb_png(), 413, "over the limit"),
        ("tiny.png", None, 422, "1x1"),
    ],
)
def test_bad_uploads_get_clear_4xx(client, name, data, status, fragment):
    if data is None:
        buf = io.BytesIO()
        Image.new("L", (1, 1)).save(buf, "PNG")
        data = buf.getvalue()
    r = _post(client, name, data)
    assert r.status_code == status and fragment in r.json()["detail"]


def test_oversized_upload_is_refused_before_reading(client):
    r = _post(client, "big.jpeg", b"\xff" * (3 * 2**20))
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    assert client.post("/v1/predict").status_code == 422  # no file field


def test_health_model_page_and_schema(client):
    assert client.get("/healthz").json()["status"] == "ok"
    info = client.get("/v1/model").json()
    assert info["config"]["backbone"] == "efficientnet_lite0" and "validation" in info["metrics"]
    assert "fitted on validation data" in info["operating_point"]
    assert "not a medical device" in info["model_card"]
    page = client.get("/")
    assert page.status_code == 200 and "not a medical device" in page.text and "cdn" not in page.text.lower()
    schema = client.get("/openapi.json").json()
    assert "PredictResponse" in schema["components"]["schemas"]
    assert client.get("/v1/predict").status_code == 405
    assert "access-control-allow-origin" not in client.get("/healthz", headers={"Origin": "http://x"}).headers


def run_server(app, **limits):
    """The production serving stack (guarded protocol, our socket) in a thread: ``(port, stop)``."""
    sock = listen("127.0.0.1", 0)
    server = make_server(app, sock, **limits)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)

    def stop():
        server.should_exit = True
        thread.join(5)

    return sock.getsockname()[1], stop


@pytest.fixture(scope="module")
def live_server(app):
    port, stop = run_server(app)
    yield f"http://127.0.0.1:{port}"
    stop()


@pytest.mark.browser
@pytest.mark.data
def test_page_in_a_real_browser(live_server, tmp_path_factory):
    """Debian's Chromium, headless, offline: upload a real X-ray, see label, probability and overlay."""
    from playwright.sync_api import sync_playwright

    xray = sorted((VAL_FULLRES / "PNEUMONIA").iterdir())[0]
    shots = tmp_path_factory.mktemp("screens")
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        outside = []
        page.on(
            "request", lambda req: outside.append(req.url) if not req.url.startswith((live_server, "data:")) else None
        )
        page.goto(live_server)
        page.wait_for_selector("#metric-validation-auc")
        page.set_input_files("#file", str(xray))
        page.wait_for_selector("#result:not([hidden])", timeout=30000)
        assert page.inner_text("#label") in ("NORMAL", "PNEUMONIA")
        assert "P(pneumonia) = 0." in page.inner_text("#probability")
        page.check("#cam-toggle")
        assert page.eval_on_selector("#overlay", "i => !i.hidden && i.complete && i.naturalWidth > 100")
        page.screenshot(path=str(shots / "page.png"))
        page.set_input_files(
            "#file", files=[{"name": "notes.jpeg", "mimeType": "image/jpeg", "buffer": b"not an image"}]
        )
        page.wait_for_selector("#error:not([hidden])")
        assert "not a recognised image" in page.inner_text("#error")
        browser.close()
    assert outside == []
    assert (shots / "page.png").stat().st_size > 10000


@pytest.fixture(scope="module")
def fault_server(trained_bundle):
    """A live server with a 1 s body timeout, for clients that misbehave."""
    app = create_app(
        classifier=Classifier.load(trained_bundle.path, engine="torch"), max_upload_bytes=2 * 2**20, body_timeout=1.0
    )
    port, stop = run_server(app)
    yield port
    stop()


def _multipart_head(port: int, length: int) -> bytes:
    return (
        f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        f'Content-Length: {length}\r\n\r\n--b\r\nContent-Disposition: form-data; name="file"; filename="x.jpeg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()


def _good_request(port: int) -> int:
    import httpx

    return httpx.post(
        f"http://127.0.0.1:{port}/v1/predict", files={"file": ("x.jpeg", REAL.read_bytes())}, timeout=30
    ).status_code


def test_slow_body_gets_408_and_the_server_keeps_serving(fault_server):
    with socket.create_connection(("127.0.0.1", fault_server), timeout=10) as s:
        s.sendall(_multipart_head(fault_server, 100_000) + REAL.read_bytes()[:1000])  # then nothing more
        start = time.time()
        reply = b""
        while b"stalled" not in reply and (chunk := s.recv(4096)):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 408") and b"stalled" in reply and time.time() - start < 5
    assert _good_request(fault_server) == 200


def test_chunked_upload_over_the_limit_is_stopped(fault_server):
    import httpx

    def body():  # no Content-Length: the server must count
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.jpeg"\r\n\r\n'
        for _ in range(64):
            yield b"\xff" * 65536  # 4 MB in all, over the 2 MB limit

    r = httpx.post(
        f"http://127.0.0.1:{fault_server}/v1/predict",
        content=body(),
        timeout=30,
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    assert _good_request(fault_server) == 200


def test_client_disconnecting_mid_upload_does_no_harm(fault_server):
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", fault_server), timeout=10) as s:
            s.sendall(_multipart_head(fault_server, 200_000) + REAL.read_bytes()[:2000])
    assert _good_request(fault_server) == 200


def test_200_concurrent_bad_uploads_then_good_ones(fault_server):
    import asyncio
    import resource

    import httpx

    async def storm():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=50)) as client:
            url = f"http://127.0.0.1:{fault_server}/v1/predict"
            bad = [client.post(url, files={"file": (f"bad{i}.jpeg", REAL.read_bytes()[: 200 + i])}) for i in range(200)]
            return [r.status_code for r in await asyncio.gather(*bad)]

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    codes = asyncio.run(storm())
    assert len(codes) == 200 and set(codes) <= {415, 422}  # unidentifiable or truncated: each refused
    assert all(_good_request(fault_server) == 200 for _ in range(5))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KB: bounded


def test_half_open_connections_are_closed_and_capped(app):
    """Clients that never finish their request head are dropped after the head deadline; connections
    beyond the cap are closed at once; the server keeps answering throughout."""
    import httpx

    port, stop = run_server(app, header_timeout=1.0, max_connections=24)
    try:
        idle = []
        for i in range(40):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * i)  # never finished
            idle.append(s)
        time.sleep(0.3)
        closed_at_once = sum(_closed(s, wait=0.05) for s in idle)
        assert closed_at_once >= 40 - 24  # over the cap
        for _ in range(8):  # a client trickling bytes does not buy time: the deadline counts from the start
            for s in idle:
                try:
                    s.send(b"a")
                except OSError:
                    pass
            time.sleep(0.2)
        assert all(_closed(s, wait=1.0) for s in idle)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    finally:
        for s in idle:
            s.close()
        stop()


@pytest.mark.browser
def test_bundle_strings_are_text_on_the_page(trained_bundle, tmp_path):
    """A bundle whose name and operating-point source carry markup (calibrate takes the source from a
    folder name): the page shows them as text, runs nothing, and shows test numbers beside validation."""
    import shutil

    from playwright.sync_api import sync_playwright

    from pneumoscan.model.bundle import write_bundle
    from pneumoscan.model.schema import WEIGHTS
    from pneumoscan.model.store import load_bundle

    copy = shutil.copytree(trained_bundle.path, tmp_path / "model")
    bundle = load_bundle(copy)
    name = "<img src=x onerror=\"document.title='owned'\">"
    config = {**bundle.config, "name": name}
    config["calibration"] = {
        "source": "<script>document.title='owned'</script>",
        "source_threshold": 0.5,
        "source_temperature": 1.0,
        "data": "<img src=y onerror=\"document.title='owned'\">",
        "images": 80,
        "patients": 60,
    }
    metrics = {**bundle.metrics, "test": bundle.metrics["validation"]}
    write_bundle(copy, config, metrics, weights=copy / WEIGHTS)
    port, stop = run_server(create_app(classifier=Classifier.load(copy, engine="torch")))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#metric-test-auc")
            time.sleep(0.3)
            assert page.title() == "pneumoscan"
            assert page.eval_on_selector_all("#model img, #model script", "n => n.length") == 0
            assert name in page.inner_text("#model") and "training hospital" in page.inner_text("#generalisation")
            browser.close()
    finally:
        stop()


def _closed(s: socket.socket, wait: float) -> bool:
    s.settimeout(wait)
    try:
        return s.recv(1024) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_security_headers_and_no_host_reflection(client):
    page = client.get("/")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy.split("script-src")[1].split(";")[0]
    assert page.headers["x-content-type-options"] == "nosniff"
    for path in ("/static", "/v1/model/", "/healthz/"):
        r = client.get(path, headers={"Host": "evil.example"}, follow_redirects=False)
        assert "evil.example" not in r.headers.get("location", "") and r.status_code < 500


def test_docs_work_offline(client):
    import re

    docs = client.get("/docs")
    assert docs.status_code == 200 and not re.search(r"(src|href)=\"(https?:)?//", docs.text)
    assert "<script>" not in docs.text  # no inline script: the CSP forbids it
    for asset in re.findall(r'(?:src|href)="(/[^"]+)"', docs.text):
        assert client.get(asset).status_code == 200, asset


def _unusable_dicoms():
    from corpus import encapsulated_dicom, encode

    grey = real_grey()
    j2k = encode(Image.fromarray(grey), "JPEG2000", irreversible=False)
    htj2k = encapsulated_dicom(j2k, "1.2.840.10008.1.2.4.201", *grey.shape)  # no installed handler decodes it
    mpeg = encapsulated_dicom(b"\x00\x00\x01\xb3" + b"\0" * 64, "1.2.840.10008.1.2.4.100", *grey.shape)  # video
    no_header = encapsulated_dicom(b"\0" * 64, "1.2.840.10008.1.2.4.90", *grey.shape)  # J2K without SIZ
    broken = dicom(grey)[:200] + b"\xff" * 50  # DICM magic, then garbage
    return [("htj2k.dcm", htj2k), ("mpeg.dcm", mpeg), ("noheader.dcm", no_header), ("broken.dcm", broken)]


def test_unusable_dicom_gets_422_and_a_non_image_415(app):
    """One definition: a file that is DICOM by its content but cannot be used is an unusable image (422);
    only a file that is no image format we read is 415."""
    client = TestClient(create_app(classifier=app.state.classifier))  # the module's app may be shut down
    for name, data in _unusable_dicoms():
        r = _post(client, name, data)
        assert r.status_code == 422 and name in r.json()["detail"], (name, r.status_code, r.text)
    r = _post(client, "notes.jpeg", b"plain text, not an image " * 20)
    assert r.status_code == 415, r.text


def _half_open(port: int, source: str, count: int) -> list[socket.socket]:
    """``count`` connections from ``source`` (any 127.x address is this machine) that never finish a head."""
    held = []
    for _ in range(count):
        s = socket.socket()
        s.bind((source, 0))
        s.settimeout(5)
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: a")
        except OSError:
            pass
        held.append(s)
    return held


def _health_from(port: int, source: str, tries: int) -> int:
    import httpx

    ok = 0
    with httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=5) as client:
        for _ in range(tries):
            try:
                ok += client.get(f"http://127.0.0.1:{port}/healthz", headers={"Connection": "close"}).status_code == 200
            except httpx.HTTPError:
                pass
    return ok


def test_one_client_address_gets_only_its_share_of_connections(app):
    """60 half-open connections from one address (cap 30, share 5): another address is still served."""
    port, stop = run_server(app, header_timeout=10.0, max_connections=30, max_per_client=5)
    held = []
    try:
        held = _half_open(port, "127.0.0.1", 60)
        time.sleep(0.3)
        assert sum(not _closed(s, wait=0.05) for s in held) <= 5
        assert _health_from(port, "127.0.0.2", 10) == 10
    finally:
        for s in held:
            s.close()
        stop()


def test_health_checks_are_answered_while_many_addresses_fill_the_server(app):
    """Ten addresses hold every connection half-open: a new client replaces the longest-waiting one."""
    port, stop = run_server(app, header_timeout=10.0, max_connections=30, max_per_client=5)
    held = []
    try:
        for n in range(3, 13):
            held += _half_open(port, f"127.0.0.{n}", 5)
        time.sleep(0.3)
        assert _health_from(port, "127.0.0.2", 10) == 10
        assert sum(not _closed(s, wait=0.05) for s in held) <= 30
    finally:
        for s in held:
            s.close()
        stop()


def test_a_trickled_body_is_cut_at_the_overall_deadline(app):
    """A byte every 0.3 s never stalls for the 1 s body timeout, but the body must be complete in 2 s."""
    quick = create_app(classifier=app.state.classifier, body_timeout=1.0, body_deadline=2.0)
    port, stop = run_server(quick)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(_multipart_head(port, 100_000))
            start, reply = time.time(), b""
            s.setblocking(False)
            while time.time() - start < 8 and b"within" not in reply:
                try:
                    s.send(b"a")
                except OSError:
                    break
                time.sleep(0.3)
                try:
                    reply += s.recv(4096)
                except BlockingIOError:
                    pass
            assert reply.startswith(b"HTTP/1.1 408") and b"not complete within 2 s" in reply, reply
            assert time.time() - start < 4
        assert _health_from(port, "127.0.0.1", 1) == 1
    finally:
        stop()


@pytest.mark.parametrize("name", ["fast", None])  # the name "fast" and the default (one bundle since the ensemble went)
def test_model_capabilities_come_from_the_loaded_model(name):
    """GET /v1/model says what the loaded model does, asked of the classifier, not of config.files (an
    ensemble's config has no files: its gate and subtype head are its primary member's)."""
    clf = Classifier.load(name)
    assert clf.has_gate and clf.has_subtype  # both bundled models have the gate and the subtype head
    client = TestClient(create_app(classifier=clf))
    info = client.get("/v1/model").json()
    assert info["capabilities"] == {"input_gate": True, "subtype": True}
    plot = io.BytesIO()
    Image.new("RGB", (400, 300), (255, 255, 255)).save(plot, "PNG")
    assert _post(client, "plot.png", plot.getvalue()).status_code == 422  # the gate the page must announce


def test_a_refused_bundle_exits_2_with_one_line_before_binding(tmp_path):
    """serve loads and checks the model before it binds the port: an oversized MODEL_CARD.md is one line
    on stderr, exit 2, no 'unclosed socket' warning, and the port was never taken."""
    import shutil
    import subprocess
    import sys

    from pneumoscan.model.schema import MAX_FILE_BYTES
    from pneumoscan.model.store import load_bundle

    bundle = shutil.copytree(load_bundle("fast").path, tmp_path / "big-card")
    (bundle / "MODEL_CARD.md").write_bytes(b"x" * (MAX_FILE_BYTES["MODEL_CARD.md"] + 1))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = Path(sys.executable).parent / "pneumoscan"  # the console script, as a user runs it
    run = subprocess.run(
        [str(script), "serve", "--model", str(bundle), "--port", str(port)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 2, run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and "MODEL_CARD.md" in lines[0], run.stderr
    assert "socket" not in run.stderr and run.stdout == ""


def _browser(p):
    return p.chromium.launch(
        executable_path="/usr/bin/chromium",
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
    )


def _gradient_png() -> bytes:
    """A grey ramp: a PNG that is not a chest X-ray (the gate refuses it)."""
    import numpy as np

    buf = io.BytesIO()
    Image.fromarray(np.tile(np.linspace(0, 255, 400, dtype=np.uint8), (300, 1))).save(buf, "PNG")
    return buf.getvalue()


def _release(route) -> None:
    """Let a held request go on to the server, unless the page has cancelled it meanwhile."""
    from playwright.sync_api import Error

    try:
        route.continue_()
    except Error as exc:
        assert "already handled" in str(exc)


@pytest.fixture(scope="module", params=["fast", None], ids=["fast", "default"])
def bundled_server(request):
    """A live server on a bundled model: the single `fast` bundle and the default (an ensemble today)."""
    port, stop = run_server(create_app(classifier=Classifier.load(request.param)))
    yield f"http://127.0.0.1:{port}"
    stop()


@pytest.mark.browser
@pytest.mark.data
def test_page_states_the_gate_and_subtype_and_drops_a_stale_result(bundled_server, tmp_path):
    """The page's notes follow GET /v1/model's capabilities; a real pneumonia film then a PNG that is not an
    X-ray leaves no label or probability of the film on the page, also when the film's answer (slow, with its
    Grad-CAM) arrives after the refusal, and nothing of it shows while the second upload is read."""
    from playwright.sync_api import sync_playwright

    xray = VAL_FULLRES / "PNEUMONIA" / "person1946_bacteria_4874.jpeg"
    plot = {"name": "plot.png", "mimeType": "image/png", "buffer": _gradient_png()}
    with sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(bundled_server)
        page.wait_for_selector("#gate-note")
        assert page.inner_text("#gate-note").startswith("Input gate on")
        assert "bacterial or viral" in page.inner_text("#subtype-note")
        # one after the other; the plot's answer is held back to look at the page while it is read
        page.set_input_files("#file", str(xray))
        page.wait_for_selector("#result:not([hidden])", timeout=60000)
        assert page.inner_text("#label") == "PNEUMONIA" and "P(pneumonia) = " in page.inner_text("#probability")
        held = []
        page.route("**/v1/predict*", lambda route: held.append(route))
        page.set_input_files("#file", files=[plot])
        page.wait_for_function("() => !document.getElementById('busy').hidden")
        assert not page.is_visible("#label") and not page.is_visible("#probability")
        page.wait_for_timeout(200)
        _release(held.pop())
        page.wait_for_selector("#error:not([hidden])", timeout=60000)
        assert "chest X-ray" in page.inner_text("#error")
        assert not page.is_visible("#result") and page.inner_text("#label") == ""
        # overlapping: the film's answer comes after the plot's refusal
        page.set_input_files("#file", str(xray))
        page.wait_for_timeout(200)
        page.unroute("**/v1/predict*")
        page.set_input_files("#file", files=[plot])
        page.wait_for_selector("#error:not([hidden])", timeout=60000)
        _release(held.pop())  # (a page may have cancelled it)
        page.wait_for_timeout(3000)  # the film's answer has come back by now, and was dropped
        assert not page.is_visible("#result") and not page.is_visible("#label")
        assert page.inner_text("#label") == "" and page.inner_text("#probability") == ""
        assert "plot.png" in page.inner_text("#error")
        page.screenshot(path=str(tmp_path / "refusal.png"), full_page=True)
        browser.close()
    keep = Path("/tmp/page-shots")
    if keep.is_dir():  # for a person to look at
        (keep / f"refusal-{Path(bundled_server).name}.png").write_bytes((tmp_path / "refusal.png").read_bytes())
