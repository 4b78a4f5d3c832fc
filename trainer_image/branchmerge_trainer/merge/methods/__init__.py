"""Merge methods: one small pure function over tensors each."""
