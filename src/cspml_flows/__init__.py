"""cspml-flows: template-based crystal structure prediction with a learned composition similarity."""

__version__ = "0.1.0"
