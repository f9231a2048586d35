"""pyvmm.cliparse: one-line errors and the help's width without shutil."""

from __future__ import annotations

import argparse
import shutil

import pytest

from pyvmm.cliparse import Parser, UsageError, terminal_columns


@pytest.mark.parametrize("columns", ["", "0", "-3", "wide", None])
def test_terminal_columns_agrees_with_shutil(monkeypatch, columns):
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    assert terminal_columns() == shutil.get_terminal_size().columns


def test_terminal_columns_takes_a_positive_columns_variable(monkeypatch):
    monkeypatch.setenv("COLUMNS", "57")
    assert terminal_columns() == 57


def test_terminal_columns_falls_back_without_a_terminal(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)

    def no_terminal(fd):
        raise OSError(25, "Inappropriate ioctl for device")

    monkeypatch.setattr("os.get_terminal_size", no_terminal)
    assert terminal_columns(fallback=91) == 91


@pytest.mark.parametrize("columns", ["40", "72", "130"])
def test_help_is_what_argparse_would_print(monkeypatch, columns):
    monkeypatch.setenv("COLUMNS", columns)

    def build(cls):
        p = cls(prog="demo", description="a parser " * 12, epilog="one\n  two",
                formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--size", metavar="SIZE", help="how big the thing should be " * 4)
        sub = p.add_subparsers(dest="command", parser_class=cls)
        sub.add_parser("run", help="run it").add_argument("--fast", action="store_true",
                                                         help="go fast " * 10)
        return p

    assert build(Parser).format_help() == build(argparse.ArgumentParser).format_help()


def test_bad_input_raises_usage_error_with_one_line():
    p = Parser(prog="demo")
    p.add_argument("--n", type=int)
    with pytest.raises(UsageError, match=r"^argument --n: invalid int value: 'x'$"):
        p.parse_args(["--n", "x"])
    sub = p.add_subparsers(dest="command", parser_class=Parser)
    sub.add_parser("go")
    with pytest.raises(UsageError, match="unrecognized arguments: --bogus"):
        p.parse_args(["go", "--bogus"])
