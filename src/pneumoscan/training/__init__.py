"""Making bundles: trainers, heads, calibration, adaptation, ensembles, export. Imports core to evaluation."""
