"""Pure on-disk format: bytes <-> values. No files, no caches, no state."""
