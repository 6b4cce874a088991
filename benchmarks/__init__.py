"""Benchmarks for sp_rope: every figure is a ratio against a baseline measured in the same process.

Run ``python -m benchmarks.run`` (``--quick`` for a < 60 s pass, ``--json PATH`` to save); see
``benchmarks/RESULTS.md`` for the figures, their targets and the numbers measured.
"""
