"""The service on the bundled model with ONNX Runtime (what the base install runs): the API docs page
renders the OpenAPI 3.1 schema in a real browser, and the page's Grad-CAM overlay needs no PyTorch."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from test_service import run_server

from pneumoscan import Classifier
from pneumoscan.cli.demo import EXAMPLES
from pneumoscan.serving.service import create_app

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]


@pytest.fixture(scope="module")
def onnx_app():
    return create_app(classifier=Classifier.load())


@pytest.fixture(scope="module")
def onnx_server(onnx_app):
    port, stop = run_server(onnx_app)
    yield f"http://127.0.0.1:{port}"
    stop()


def test_openapi_is_3_1_and_the_docs_assets_are_swagger_ui_5(onnx_app):
    client = TestClient(onnx_app)
    assert client.get("/openapi.json").json()["openapi"].startswith("3.1")
    bundle = client.get("/docs-assets/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and bundle.headers["content-type"].startswith("text/javascript")
    assert client.get("/docs-assets/__init__.py").status_code == 404  # only the two files the page uses


def test_cam_without_autograd(onnx_app):
    client = TestClient(onnx_app)
    xray = sorted((EXAMPLES / "PNEUMONIA").iterdir())[0]
    r = client.post("/v1/predict", files={"file": (xray.name, xray.read_bytes())}, params={"cam": "true"})
    assert r.status_code == 200 and r.json()["cam"] and r.json()["label"] == "PNEUMONIA"
    clf = onnx_app.state.classifier
    # the default predicts on int8; the map came from its fp32 ONNX model and numpy, never autograd
    assert clf.engine.name == "onnx-int8" and clf._torch_net is None


@pytest.mark.browser
def test_docs_page_lists_the_operations_in_a_real_browser(onnx_server):
    """Debian's Chromium, headless, offline: Swagger UI renders the schema (no 'Unable to render')."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page()
        outside, errors = [], []
        page.on("request", lambda req: None if req.url.startswith(onnx_server) else outside.append(req.url))
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(f"{onnx_server}/docs")
        page.wait_for_selector(".opblock-summary-path", timeout=30000)
        paths = {el.inner_text().strip() for el in page.query_selector_all(".opblock-summary-path")}
        body = page.inner_text("body")
        browser.close()
    assert {"/v1/predict", "/v1/model", "/healthz"} <= {p.replace("\u200b", "") for p in paths}
    assert "Unable to render" not in body and outside == [] and errors == []


@pytest.mark.browser
def test_a_field_added_to_the_record_shows_on_the_page(onnx_server, monkeypatch):
    """The page renders a result from the record's declared fields (GET /v1/fields): a field added to the
    record (here with markup in its value) shows under its name, as text, with no change to the page."""
    from playwright.sync_api import sync_playwright

    from pneumoscan.inference import result as output

    recorded = output.record
    monkeypatch.setattr(output, "FIELDS", (*output.FIELDS, "lung_side"))
    monkeypatch.setattr(output, "record", lambda result: {**recorded(result), "lung_side": "<b>left</b>"})
    xray = sorted((EXAMPLES / "PNEUMONIA").iterdir())[0]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(onnx_server)
        page.set_input_files("#file", str(xray))
        page.wait_for_selector("#result:not([hidden])", timeout=30000)
        added = page.inner_text("#field-lung_side")
        shown = [page.inner_text(f"#field-{name} th") for name in ("path", "probability", "label", "gate_score")]
        markup = page.eval_on_selector_all("#record b", "nodes => nodes.length")
        browser.close()
    assert "lung side" in added and "<b>left</b>" in added and markup == 0 and errors == []
    assert shown == [output.LABELS[n] for n in ("path", "probability", "label", "gate_score")]


def test_the_response_model_and_the_field_list_follow_the_record(onnx_app):
    """GET /v1/fields is output.FIELDS in order; the response model documents every field a 200 can carry."""
    from pneumoscan.inference import result as output
    from pneumoscan.serving.service import PredictResponse

    listed = TestClient(onnx_app).get("/v1/fields").json()
    assert [f["name"] for f in listed] == list(output.FIELDS)
    assert all(f["label"] and f["digits"] == output.DIGITS.get(f["name"]) for f in listed)
    assert set(output.FIELDS) - {"error"} <= set(PredictResponse.model_fields)
