"""The argument parser of both command lines, ``pyvmm`` and ``pyvmm-virtiofsd``.

It is ``argparse.ArgumentParser`` with two changes:

* bad input raises ``UsageError``; the command prints its one line and exits 2
  (no usage dump, no traceback);
* the help text's width comes from ``terminal_columns()``.  argparse asks
  ``shutil.get_terminal_size`` each time it makes a help formatter (every
  ``add_argument`` makes one), and importing shutil imports bz2, lzma and zlib:
  about 0.5 MiB in every VMM and back-end process, none of which compresses
  anything.  (No dataclasses or typing here either: pyvmm-virtiofsd's waiting
  parent imports this module.)
"""

from __future__ import annotations

import argparse
import functools
import os
import sys


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit 2."""


def terminal_columns(fallback: int = 80) -> int:
    """$COLUMNS when it is a positive number, else the width of the terminal on
    standard output, else ``fallback`` (shutil.get_terminal_size's rule)."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns > 0:
        return columns
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or fallback
    except (AttributeError, ValueError, OSError):
        return fallback


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise UsageError and whose help formatter is
    given its width (argparse's default: the terminal's width less 2)."""

    def __init__(self, *args, formatter_class: type = argparse.HelpFormatter, **kwargs) -> None:
        sized = functools.partial(formatter_class, width=terminal_columns() - 2)
        super().__init__(*args, formatter_class=sized, **kwargs)

    def error(self, message: str) -> None:  # one line, exit 2
        raise UsageError(message)
