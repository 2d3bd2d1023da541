"""The package version, apart from ``__init__`` so that every module can read it without
importing the public API (which would import that module back)."""

__version__ = "0.1.0"
