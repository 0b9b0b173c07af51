"""Which layer of the package each test file tests (docs/architecture.md): conftest marks every test with
its layer, so that ``python -m pytest -m LAYER`` runs one layer's tests. ``package`` marks the tests of the
package as a whole (its layout, its documentation, its install, hostile inputs across every layer)."""

LAYERS = {
    "core": ["test_metrics.py"],
    "io": ["test_data.py", "test_data_prepare.py", "test_dicom_sr.py", "test_fuzz.py", "test_images.py"],
    "model": [
        "test_backbones.py", "test_bundle.py", "test_feature_heads.py", "test_frozen_onnx.py", "test_gate.py",
        "test_models.py", "test_subtype.py",
    ],
    "inference": [
        "test_distributed.py", "test_explain.py", "test_explain_overlay.py", "test_inference.py",
        "test_int8_default.py", "test_output.py", "test_torch_free.py",
    ],
    "evaluation": ["test_evaluation.py", "test_verify.py"],
    "training": [
        "test_adapt.py", "test_calibrate.py", "test_calibrate_signal.py", "test_distill.py", "test_ensemble.py",
        "test_features.py", "test_heads.py", "test_recipe.py", "test_training.py",
    ],
    "serving": ["test_dicom_node.py", "test_service.py", "test_service_docs.py"],
    "cli": ["test_cli.py", "test_default_model.py", "test_documented_commands.py", "test_front_door.py"],
    "package": ["test_architecture.py", "test_base_install.py", "test_docs.py", "test_security.py"],
}  # fmt: skip
LAYER_OF = {name: layer for layer, names in LAYERS.items() for name in names}
