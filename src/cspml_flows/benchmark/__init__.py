"""Benchmark protocols (``mp20bt``, ``mpts52``), scoring, baselines and reports."""
