"""Merge stage: streaming tensor engine and merge methods."""
