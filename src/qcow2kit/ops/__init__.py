"""Whole-image operations: create, info, map, convert, compare, resize, check, compact."""
