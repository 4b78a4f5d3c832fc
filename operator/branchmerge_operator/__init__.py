"""branchmerge control plane: API models, planner, operator and local executor (no torch)."""

__version__ = "0.1.0"
