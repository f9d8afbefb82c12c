"""Byte storage underneath an image. Knows nothing about qcow2."""
