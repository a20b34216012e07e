"""Pure prediction functions: retrieval, substitution, validity, deduplication (no jobflow here)."""
