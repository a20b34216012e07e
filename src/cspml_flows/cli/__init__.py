"""The ``cspml`` command line: every command parses, calls the library and prints."""
