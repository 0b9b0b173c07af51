"""The HTTP service and its page, the DICOM node. Imports core, io, model, inference."""
