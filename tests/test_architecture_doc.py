"""docs/architecture.md follows the code (fast: no KVM, no guest, no graphviz).

* Fixed addresses: each row's address (``0xSTART`` or ``0xSTART-0xEND``, END
  inclusive) is explained by the constants backticked in its last column, and
  each constant explains one of its numbers: a constant equals START or END + 1,
  or is a size (a name ending in ``_SIZE``, ``_MAX`` or ``_LEN``, or a ctypes
  structure) with START + size == END + 1.
* What depends on ``--memory``: the RAM ranges and the 64-bit PCI window are
  those of ``pyvmm.boot.e820.ram_ranges()`` and ``pyvmm.vm.pci_windows()``.
* Port I/O: the table is exactly the machine's port-I/O bus, as
  ``Machine._add_legacy_devices()`` and the PCI root register it.
* Code map: every module exists, every module of 150 lines or more is listed,
  and a listed size is within a third of the real one (or 40 lines).
* docs/glossary.md: every term says where it is in the code and in a spec.
* The picture: every label line of docs/architecture.dot is in
  docs/architecture.svg, so an edit of the source without a new render fails.
"""

from __future__ import annotations

import ctypes
import importlib
import re
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "architecture.md"

ADDRESS = re.compile(r"^(0x[0-9A-Fa-f]+)(?:-(0x[0-9A-Fa-f]+))?$")
SIZE_NAME = re.compile(r"_(SIZE|MAX|LEN)$")


# --- reading the page ---------------------------------------------------------------------
def section(text: str, title: str) -> str:
    """The body of the section headed ``title`` (up to the next heading of its level or above)."""
    m = re.search(rf"^(#+) {re.escape(title)}\s*$", text, re.M)
    assert m, f"docs/architecture.md has no section {title!r}"
    level = len(m.group(1))
    end = re.compile(rf"^#{{1,{level}}} ", re.M).search(text, m.end())
    return text[m.end():end.start() if end else len(text)]


def table_rows(body: str) -> list[list[str]]:
    """The cells of every table row but the header and the separator."""
    rows = []
    for line in body.splitlines():
        if not line.startswith("|") or re.fullmatch(r"\|[-| ]+\|", line.strip()):
            continue
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    return [r for r in rows if r and r[0] not in ("address", "ports", "module", "`--memory`")]


def spans(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def constant(name: str) -> object:
    """``boot.layout.GDT_ADDR`` and the like, read relative to pyvmm."""
    module, _, attr = f"pyvmm.{name}".rpartition(".")
    return getattr(importlib.import_module(module), attr)


def addresses(cell: str) -> tuple[int, int | None]:
    m = ADDRESS.match(cell)
    assert m, f"not an address or range: {cell!r}"
    return int(m.group(1), 16), int(m.group(2), 16) if m.group(2) else None


def explain(start: int, end: int | None, names: list[str]) -> list[str]:
    """Problems with one row: numbers no constant explains, constants that explain nothing."""
    problems, explained_start, explained_end = [], False, end is None
    for name in names:
        value = constant(name)
        if isinstance(value, type) and issubclass(value, ctypes.Structure):
            value, is_size = ctypes.sizeof(value), True
        else:
            is_size = bool(SIZE_NAME.search(name))
        if not isinstance(value, int):
            problems.append(f"{name} is not a number")
        elif is_size:
            if end is None or start + value != end + 1:
                problems.append(f"{name} = {value:#x} is not the size of the range")
            explained_end = explained_end or (end is not None and start + value == end + 1)
        elif value == start:
            explained_start = True
        elif end is not None and value == end + 1:
            explained_end = True
        else:
            problems.append(f"{name} = {value:#x} is neither the start nor the end + 1")
    if not explained_start:
        problems.append(f"no constant says the start {start:#x}")
    if not explained_end:
        problems.append(f"no constant says the end {end:#x}")
    return problems


# --- the tests ---------------------------------------------------------------------------------
def test_fixed_addresses_are_the_codes():
    rows = table_rows(section(DOC.read_text(), "Fixed addresses"))
    assert len(rows) >= 15
    problems = []
    for address, what, code in rows:
        start, end = addresses(address)
        names = spans(code)
        problems += [f"{address} ({what[:40]}...): {p}" for p in (explain(start, end, names)
                                                                  if names else ["no constant"])]
    assert not problems, "\n".join(problems)


def test_a_moved_constant_fails_the_table(monkeypatch):
    import pyvmm.boot.layout as layout

    monkeypatch.setattr(layout, "ZERO_PAGE_ADDR", 0x8000)
    with pytest.raises(AssertionError, match="0x7000-0x7FFF"):
        test_fixed_addresses_are_the_codes()


def test_explain_checks_every_number_and_every_constant():
    assert explain(0x500, None, ["boot.layout.GDT_ADDR"]) == []
    assert explain(0x20000, 0x20FFF, ["boot.layout.CMDLINE_ADDR", "boot.layout.CMDLINE_MAX"]) == []
    assert explain(0x20000, 0x20FFF, ["boot.layout.CMDLINE_ADDR"]) == ["no constant says the end 0x20fff"]
    assert explain(0x20000, None, ["boot.layout.CMDLINE_ADDR", "boot.layout.GDT_ADDR"]) == [
        "boot.layout.GDT_ADDR = 0x500 is neither the start nor the end + 1"]
    assert explain(0x7000, 0x7FFF, ["boot.layout.ZERO_PAGE_ADDR", "boot.bzimage.BootParams"]) == []


def test_what_depends_on_memory_is_the_codes():
    from pyvmm.boot.e820 import ram_ranges
    from pyvmm.cli import parse_size
    from pyvmm.vm import pci_windows

    rows = table_rows(section(DOC.read_text(), "What depends on `--memory`"))
    assert len(rows) >= 3
    for memory, ram, window in rows:
        size = parse_size(memory.split()[0])
        documented = [addresses(r.strip()) for r in ram.split(",")]
        assert documented == [(gpa, gpa + n - 1) for gpa, n, _ in ram_ranges(size)], memory
        start, end = pci_windows(size)[1]
        assert addresses(window) == (start, end - 1), memory


def pio_registrations() -> list[tuple[int, int]]:
    """[(first port, last port)] of everything on a machine's port-I/O bus, found by
    building the bus as the machine does (no KVM needed) and probing every port."""
    from pyvmm.bus import Bus
    from pyvmm.pci.root import PCI_CONFIG_ADDRESS, PCI_CONFIG_IO_LEN
    from pyvmm.vm import Machine, MachineConfig

    machine = Machine.__new__(Machine)
    machine.config = MachineConfig(kernel=b"", cmdline="", memory=256 << 20)
    machine.console = types.SimpleNamespace(write=lambda data: None)
    machine.pio = Bus("pio")
    machine._add_legacy_devices()
    machine.pio.register(PCI_CONFIG_ADDRESS, PCI_CONFIG_IO_LEN, object())   # as Machine.__init__ does
    ranges: list[tuple[int, int]] = []
    previous = None
    for port in range(0x10000):
        hit = machine.pio.find(port)
        device = hit and (id(hit[0]), port - hit[1])
        if hit and device == previous:
            ranges[-1] = (ranges[-1][0], port)
        elif hit:
            ranges.append((port, port))
        previous = device
    return ranges


def test_port_table_is_the_port_bus():
    rows = table_rows(section(DOC.read_text(), "Port I/O"))
    documented = []
    for ports, what, code in rows:
        start, end = addresses(ports)
        names = spans(code)
        assert names and constant(names[0]) == start, f"{ports} ({what}): {names}"
        documented.append((start, start if end is None else end))
    assert sorted(documented) == pio_registrations()


def code_map() -> list[tuple[str, int]]:
    rows = table_rows(section(DOC.read_text(), "Code map"))
    return [(spans(path)[0], int(lines)) for path, lines, _ in rows]


def lines_of(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_code_map_lists_existing_modules_with_their_sizes():
    problems = []
    for path, listed in code_map():
        f = REPO / path
        if not f.is_file():
            problems.append(f"{path} does not exist")
            continue
        actual = lines_of(f)
        if abs(actual - listed) > max(listed / 3, 40):
            problems.append(f"{path}: listed with {listed} lines, has {actual}")
    assert not problems, "update the code map in docs/architecture.md:\n" + "\n".join(problems)


def test_code_map_lists_every_module_of_150_lines():
    listed = {path for path, _ in code_map()}
    big = sorted(f.relative_to(REPO).as_posix() for f in (REPO / "pyvmm").rglob("*.py")
                 if "_guest" not in f.parts and lines_of(f) >= 150)
    missing = [path for path in big if path not in listed]
    assert not missing, f"add to the code map in docs/architecture.md: {missing}"


def dot_label_lines(dot: str) -> list[str]:
    """Every line of every (head/tail) label of a graphviz source."""
    out = []
    for m in re.finditer(r'\b(?:label|headlabel|taillabel)="((?:[^"\\]|\\.)*)"', dot):
        out += [line.replace('\\"', '"').strip() for line in re.split(r"\\[nlr]", m.group(1))]
    return [line for line in out if line]


def svg_text(svg: str) -> str:
    import html

    return "\n".join(html.unescape(t) for t in re.findall(r"<text[^>]*>([^<]*)</text>", svg))


def test_the_picture_is_rendered_from_its_source():
    dot = (REPO / "docs" / "architecture.dot").read_text()
    svg = svg_text((REPO / "docs" / "architecture.svg").read_text())
    labels = dot_label_lines(dot)
    assert len(labels) > 40
    stale = [line for line in labels if line not in svg]
    assert not stale, ("docs/architecture.svg is older than docs/architecture.dot; run "
                       f"dot -Tsvg docs/architecture.dot -o docs/architecture.svg (missing: {stale})")
    assert "dot -Tsvg docs/architecture.dot -o docs/architecture.svg" in DOC.read_text()


def test_a_label_missing_from_the_picture_is_reported():
    assert dot_label_lines('a [label="one\\ntwo"]; a -> b [headlabel="three"];') == ["one", "two", "three"]
    assert "two" not in svg_text('<svg><text x="1">one</text><text>th&amp;ree</text></svg>')
    assert "th&ree" in svg_text('<svg><text x="1">one</text><text>th&amp;ree</text></svg>')


def test_every_glossary_term_names_its_code_and_its_spec():
    """Each term: a "- Code:" line with backticked names (tests/test_docs.py resolves
    them) and a "- Spec:" line."""
    text = (REPO / "docs" / "glossary.md").read_text()
    terms = re.split(r"^## ", text, flags=re.M)[1:]
    assert len(terms) >= 30
    problems = []
    for term in terms:
        name = term.splitlines()[0]
        code = re.search(r"^- Code: (.*?)(?=^- |\Z)", term, re.M | re.S)
        if not code or not spans(code.group(1)):
            problems.append(f"{name}: no '- Code:' line naming the code")
        if not re.search(r"^- Spec: \S", term, re.M):
            problems.append(f"{name}: no '- Spec:' line")
    assert not problems, "\n".join(problems)
