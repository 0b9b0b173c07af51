"""The pneumoscan command: argument parsing over the API, and the demo. Imports every layer."""
