#!/usr/bin/env python3
"""The configuration of the guest's busybox, for guest/build-busybox.sh.

The fragment: the options of guest/busybox.config plus ``CONFIG_<SYMBOL>=y`` for
each applet the guest wants.  An applet's symbol is read from the busybox source,
where each applet is declared as ``//applet:IF_<SYMBOL>(APPLET...(<name>, ...))``
(e.g. ``[`` is TEST1, ``sh`` is SH_IS_ASH).  busybox's allnoconfig turns every bool
off even when KCONFIG_ALLCONFIG names one, so build-busybox.sh configures in steps:
``make allnoconfig``; ``apply`` the fragment; ``make oldconfig`` (the options that
appear get their defaults); ``prune`` every bool the fragment does not set;
``make oldconfig`` again (what an option selects comes back); ``check``.

    busybox_config.py fragment SOURCE_DIR OPTIONS_FILE APPLET...
        prints the fragment (status 2 when an applet is not in that source)
    busybox_config.py apply CONFIG FRAGMENT      sets the fragment's options in CONFIG
    busybox_config.py prune CONFIG FRAGMENT      turns off CONFIG's other bools
    busybox_config.py check CONFIG FRAGMENT
        status 1, naming them, when lines of the fragment did not survive into CONFIG
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

# //applet:IF_TEST1(APPLET_NOFORK([,  test, ...)), and with inner conditions:
# //applet:IF_LSMOD(IF_NOT_MODPROBE_SMALL(APPLET_NOEXEC(lsmod, ...))): the outer one is the applet's.
APPLET_DECLARATION = re.compile(
    r"//applet:\s*IF_([A-Z0-9_]+)\(\s*(?:IF_[A-Z0-9_]+\(\s*)*APPLET[A-Z_]*\(\s*([^,\s]+)\s*,")
# Where a name is declared by two symbols (sh and bash: ash or hush), the guest's shell is ash.
PREFERRED_SYMBOLS = ("SH_IS_ASH", "BASH_IS_ASH")


class UnknownApplet(ValueError):
    """An applet that the busybox source does not declare."""


def applet_symbols_of(texts: list[str]) -> dict[str, str]:
    """Applet name -> the Kconfig symbol (without CONFIG_) that builds it."""
    found: dict[str, set[str]] = {}
    for text in texts:
        for symbol, name in APPLET_DECLARATION.findall(text):
            found.setdefault(name, set()).add(symbol)
    symbols = {}
    for name, candidates in found.items():
        preferred = [s for s in PREFERRED_SYMBOLS if s in candidates]
        symbols[name] = preferred[0] if preferred else sorted(candidates)[0]
    return symbols


def applet_symbols(source: Path) -> dict[str, str]:
    """The applet symbols of a busybox source tree (its *.c files)."""
    return applet_symbols_of([p.read_text(errors="replace") for p in sorted(source.rglob("*.c"))])


def fragment(symbols: dict[str, str], options: str, applets: list[str]) -> str:
    """The KCONFIG_ALLCONFIG fragment: the options' assignments, then one line per applet."""
    unknown = [a for a in applets if a not in symbols]
    if unknown:
        raise UnknownApplet(f"busybox has no applet {', '.join(unknown)}")
    lines = [line.strip() for line in options.splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    for line in lines:
        if not re.fullmatch(r"CONFIG_[A-Z0-9_]+=\S.*", line):
            raise ValueError(f"not a CONFIG_X=value line: {line}")
    seen = set(lines)
    for applet in applets:
        line = f"CONFIG_{symbols[applet]}=y"
        if line not in seen:
            seen.add(line)
            lines.append(line)
    return "".join(f"{line}\n" for line in lines)


# "CONFIG_X=value" or "# CONFIG_X is not set": X
CONFIG_LINE = re.compile(r"(?:# )?CONFIG_([A-Z0-9_]+)(?:=| is not set$)")


def symbol_of(line: str) -> str | None:
    match = CONFIG_LINE.match(line)
    return match.group(1) if match else None


def apply(config: str, wanted: str) -> str:
    """CONFIG with each option of ``wanted`` set as it says (replaced in place, or added)."""
    settings = {symbol_of(line): line for line in wanted.splitlines() if symbol_of(line)}
    lines = []
    for line in config.splitlines():
        symbol = symbol_of(line)
        lines.append(settings.pop(symbol) if symbol in settings else line)
    lines.extend(settings.values())
    return "".join(f"{line}\n" for line in lines)


def prune(config: str, wanted: str) -> str:
    """CONFIG with every bool that is on but not named by ``wanted`` turned off."""
    keep = {symbol_of(line) for line in wanted.splitlines()}
    lines = []
    for line in config.splitlines():
        symbol = symbol_of(line)
        if line.endswith("=y") and symbol is not None and symbol not in keep:
            line = f"# CONFIG_{symbol} is not set"
        lines.append(line)
    return "".join(f"{line}\n" for line in lines)


def missing(config: str, wanted: str) -> list[str]:
    """The lines of ``wanted`` that are not lines of ``config``."""
    have = set(config.splitlines())
    return [line for line in wanted.splitlines() if line and line not in have]


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "fragment":
        source, options, applets = Path(argv[1]), Path(argv[2]).read_text(), argv[3:]
        try:
            sys.stdout.write(fragment(applet_symbols(source), options, applets))
        except ValueError as e:
            sys.stderr.write(f"busybox_config: {e}\n")
            return 2
        return 0
    if len(argv) == 3 and argv[0] in ("apply", "prune"):
        config = Path(argv[1])
        edit = apply if argv[0] == "apply" else prune
        config.write_text(edit(config.read_text(), Path(argv[2]).read_text()))
        return 0
    if len(argv) == 3 and argv[0] == "check":
        lost = missing(Path(argv[1]).read_text(), Path(argv[2]).read_text())
        for line in lost:
            sys.stderr.write(f"busybox_config: {line} did not stick\n")
        return 1 if lost else 0
    sys.stderr.write("usage: busybox_config.py fragment SOURCE OPTIONS APPLET... | "
                     "apply|prune|check CONFIG FRAGMENT\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
