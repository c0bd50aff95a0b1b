"""The package version, in a module of its own so that modules the package imports can read it without importing
the package ``__init__`` (an import cycle)."""
__version__ = "0.1.0"
