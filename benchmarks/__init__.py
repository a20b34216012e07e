"""Benchmarks of cspml-flows (not part of the installed package; run from the repository root).

``python -m benchmarks csp | relax-flow`` (:mod:`benchmarks.cli`), ``python -m benchmarks.<module>`` for the
others; ``benchmarks/README.md`` lists them. They use the public API of :mod:`cspml_flows` only.
"""
