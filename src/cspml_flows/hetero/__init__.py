"""Heterogeneous composition <-> structure retrieval: one model that places compositions and structures in a
shared space (metastable polymorph ranking, inverse design, user-defined templates)."""
