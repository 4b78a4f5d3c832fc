"""Eval stage: benchmarks, generation, answer checking and the code sandbox."""
