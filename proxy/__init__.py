"""Sluice: a rate-limit and short-link edge proxy."""

__version__ = "0.1.0"
