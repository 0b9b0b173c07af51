"""Figures (PNG) and the HTML report of an evaluation. Imports core."""
