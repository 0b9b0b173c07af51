"""Held-out evaluation, the ledger of test reads, bundle verification. Imports core to inference."""
