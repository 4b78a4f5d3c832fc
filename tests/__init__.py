"""Test suite of branchmerge (unit, integration against a real control plane, e2e)."""
