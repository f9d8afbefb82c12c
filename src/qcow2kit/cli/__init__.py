"""Command-line front end: `qcow2kit VERB ...`, one module per verb."""
