"""Errors shrink raises for bad input; the CLI prints them as one line and exits non-zero."""


class ShrinkError(Exception):
    """Bad input a user can fix: a missing or corrupt file, a wrong folder, an unsupported version."""
