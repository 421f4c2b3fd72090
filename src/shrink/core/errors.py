"""Errors shrink raises for bad input; the CLI prints them as one line and exits non-zero, and shows any
other exception as the bug it is."""


class ShrinkError(ValueError):
    """Bad input a user can fix: a missing or corrupt file, a wrong folder, an unsupported version, an
    option or format that does not fit the model. A ValueError, so code that caught the ValueErrors
    earlier versions raised for bad options still catches them."""
