"""The model artifact: networks, feature heads, bundle and ensemble formats, ONNX. Imports core, io, report."""
