"""Files in and out: safe writes, the one image loader, the Kaggle layout, DICOM SR. Imports core."""
