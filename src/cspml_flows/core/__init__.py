"""Base layer: composition, descriptors, prototypes, structure equivalence, documents, configuration."""
