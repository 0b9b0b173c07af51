"""The feature heads on a network's pooled features (input gate, subtype) and their registry."""
