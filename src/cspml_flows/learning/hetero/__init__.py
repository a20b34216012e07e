"""The heterogeneous composition <-> structure model: encoders, structure tower, scoring."""
