"""Real datasets for the examples and benchmarks.

Fetch them once with ``python -m examples.data.fetch all`` (see :mod:`examples.data.fetch`);
the datamodules in :mod:`examples.data.datamodules` only read that cache.
"""
