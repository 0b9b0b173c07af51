"""Errors, labels, options declared once, metrics, text crossing a trust boundary. Imports no layer."""
