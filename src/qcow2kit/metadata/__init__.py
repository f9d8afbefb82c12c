"""qcow2 metadata over a Storage: caches, refcounts, L1/L2 mapping, header updates.
This layer owns every crash-ordering rule. Imports format, io and errors only."""
