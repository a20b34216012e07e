"""User-facing errors: each names the problem in one line; the CLI prints them without a traceback."""

from __future__ import annotations


class CSPMLError(Exception):
    """Base class for errors caused by user input or configuration."""


class CompositionError(CSPMLError, ValueError):
    """A formula that cannot be parsed or names an unknown element."""


class StructureReadError(CSPMLError, ValueError):
    """A CIF/POSCAR file or string that cannot be read."""


class StoreError(CSPMLError):
    """A template store that is missing, empty or unreachable."""


class ModelError(CSPMLError):
    """A model file that is missing, unreadable or incompatible."""


class ConfigError(CSPMLError):
    """A missing or invalid configuration value."""
