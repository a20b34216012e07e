"""Scale benchmark of cspml-flows: deterministic template pools (:mod:`benchmarks.pools`) and the timed stages a
user runs on them (:mod:`benchmarks.scale`). Not part of the installed package."""
