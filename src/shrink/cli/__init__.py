"""The `shrink` command line: one program, one module per subcommand (quantize, distill, compare,
search and demo, export, inspect). Options that the library has a config dataclass for take their
defaults and help from it (`common.config_option`); the commands call the library and print its records.
Run as `shrink ...` or `python -m shrink.cli ...` (which torchrun uses for distributed distillation)."""

from . import compare, distill, export, inspect, quantize, search  # noqa: F401  (each registers its subcommand)
from .common import main

__all__ = ["main"]
