"""The package version: pyproject.toml reads it from here, and saved activation caches record it."""

__version__ = "0.1.0"
