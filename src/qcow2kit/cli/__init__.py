"""Command-line front end: `qcow2kit VERB ...`, one module per verb, main.py dispatching.

Owns argument parsing, the text printed to the terminal and exit codes (qemu-img's); never
holds image logic of its own: every verb calls the library (qcow2kit, qcow2kit.ops).
"""
