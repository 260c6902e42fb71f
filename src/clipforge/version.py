"""clipforge's version, in a module of its own so that every submodule can read it without importing the
top-level package (whose ``__init__`` imports the public API, and so most of clipforge)."""

__version__ = "0.1.0"
