"""The documentation stands alone and cannot rot (fast: no KVM, no guest).

For README.md and every docs/*.md:

* every repository path named in backticks or in a link exists.  A path is a
  span whose first component is a top-level entry of the repository
  (``TOP_LEVEL``), or any span with a ``/`` that ends in ``.py``.  Build
  products (``GENERATED``) are exempt; ``…``, ``*`` and ``<placeholder>`` in a
  path are wildcards that must match at least one file;
* every Python name in backticks resolves, the modules imported and the
  attributes looked up: ``pyvmm.module[.attr...]``, ``Class`` and
  ``Class.attr`` (a pyvmm class, or a builtin such as ``ValueError``; an
  attribute may also be a dataclass field or one that the class's methods
  set on ``self``), ``function()`` (with or without arguments);
* every relative link resolves, its ``#anchor`` included.

docs/cli.md also carries ``pyvmm.status.EXIT_STATUS_TABLE`` exactly and
names every command-line option the parsers define, and no other.  Across the
project, every ``docs/NAME.md`` mentioned exists and every citation
``docs/NAME.md "Section"`` or ``docs/vhost-user-dax.md N.N`` names a section
that exists; and no file mentions the team's documents that a clone does not
have (``FORBIDDEN``).

Spans that are not Python are recognised by rule, not listed:

1. spans with spaces that are not a call: shell commands and text
   (``make test``, ``pyvmm run --exec``);
2. spans that start with ``-``, ``/``, ``$``, ``<``, ``~``, a quote, or hold
   ``=``, ``*``, ``…``, ``:``, and file names without a directory: options,
   host paths, environment variables, placeholders, string literals, kernel
   command-line words, a user's files (``--cpus``, ``/dev/kvm``, ``"HdrS"``,
   ``pyvmm.run=PATH``, ``conftest.py``);
3. ALL_CAPS names, alone or called: KVM ioctls and capabilities, protocol
   messages, flags, errno values, kernel options (``KVM_SET_USER_MEMORY_REGION``,
   ``SHMEM_MAP``, ``KVM_ENABLE_CAP(...)``).  A pyvmm constant is checked when it
   is written qualified: ``pyvmm.status.EXIT_STATUS_TABLE``, ``ExitStatus.OK``;
4. one lowercase word that is not called: instructions, programs, C structs
   and fields (``int3``, ``vmlinux``, ``kvm_run``);
5. dotted lowercase names whose head is not a pyvmm module: the standard
   library, kernel parameters, C fields (``os.urandom``, ``i8042.noaux``,
   ``kvm_run.immediate_exit``); with a pyvmm module's name as head
   (``boot.e820.ram_ranges()``) they are read relative to ``pyvmm``;
6. a lowercase call that pyvmm does not define is C when it is a manual page
   (``write(2)``), a function of the C library (looked up with ctypes), or a
   function that the repository's C sources in guest/ define or call
   (``map_aligned()``, ``pvm_syscall_fixup()``).

Problems in files that another engineer is changing right now are listed in
``BEING_FIXED_ELSEWHERE``: they make their test an expected failure, and
``test_expected_failures_are_still_real`` fails once one of them is fixed so
that the list is pruned.
"""

from __future__ import annotations

import argparse
import builtins
import ctypes
import importlib
import inspect
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent

# The repository's top-level entries: a backticked span that starts with one is a path.
TOP_LEVEL = ("README.md", "Makefile", "pyproject.toml", "MANIFEST.in", "LICENSE",
             "pyvmm", "guest", "docs", "tests", "bench", "examples")
# Build products a clone does not have until something made them.
GENERATED = ("guest/build",      # make guest
             "pyvmm/_guest",     # the wheel's copy of guest/
             "bench/results",    # make bench-*
             ".venv", "dist")    # make setup, pip wheel
# What the no-private-documents rule covers (".ci" only exists in a clone).
PROJECT = TOP_LEVEL + (".ci",)

# The team's documents a clone does not have.  Written so that this file does not
# match itself.
FORBIDDEN = {
    "the team's shared folder": re.compile(r"\.\./shared"),
    "the team's design notes": re.compile(r"DESIGN\.md"),
    "the team's reference notes": re.compile(r"shared/referenc[e]"),
    "a section number of the team's reference notes": re.compile(r"\breference [0-9]+\.[0-9]", re.I),
}

# Known problems in files that another engineer is changing right now (they may not
# be edited on this branch).  Each entry: (file, a piece of the offending text) ->
# the fix.  Remove an entry once the fix has landed: the stale-list test says when.
BEING_FIXED_ELSEWHERE: dict[tuple[str, str], str] = {}


# --- markdown -------------------------------------------------------------------------------
FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"`([^`]+)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


@dataclass(frozen=True)
class Span:
    line: int
    text: str


def blank_fences(text: str) -> str:
    """``text`` with fenced code blocks blanked out, line numbers kept."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def code_spans(text: str) -> list[Span]:
    """Inline code outside fenced blocks; a span may wrap onto the next line."""
    prose = blank_fences(text)
    return [Span(prose.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split()))
            for m in CODE_SPAN.finditer(prose)]


def link_targets(text: str) -> list[Span]:
    prose = CODE_SPAN.sub(lambda m: " " * len(m.group(0)), blank_fences(text))
    return [Span(prose.count("\n", 0, m.start()) + 1, m.group(1)) for m in LINK.finditer(prose)]


def headings(text: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", blank_fences(text), re.M)]


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for h in headings(text):
        a = anchor(h)
        out.add(a if a not in seen else f"{a}-{seen[a]}")
        seen[a] = seen.get(a, 0) + 1
    return out


# --- paths ----------------------------------------------------------------------------------
def is_repo_path(span: str) -> bool:
    if any(c.isspace() for c in span) or "=" in span:
        return False
    head = span.split("/", 1)[0]
    return head in TOP_LEVEL or ("/" in span and span.endswith(".py"))


def path_problem(root: Path, span: str) -> str | None:
    path = span.rstrip("/")
    if any(path == g or path.startswith(g + "/") for g in GENERATED):
        return None
    if re.search(r"[…*<]", path):
        pattern = re.sub(r"<[^>]*>", "*", path).replace("…", "*")
        return None if next(root.glob(pattern), None) else f"no file matches {span!r}"
    return None if (root / path).exists() else f"{span!r} does not exist"


def link_problem(root: Path, doc: Path, target: str) -> str | None:
    if re.match(r"[a-z][a-z0-9+.-]*:", target):   # http:, https:, mailto:
        return None
    path, _, frag = target.partition("#")
    dest = (doc.parent / path).resolve() if path else doc
    if root.resolve() not in (dest, *dest.parents):
        return f"link {target!r} leaves the repository"
    if not dest.exists():
        return f"link {target!r} does not resolve"
    if frag and dest.suffix == ".md" and frag not in anchors(dest.read_text()):
        return f"link {target!r}: {dest.name} has no section with anchor #{frag}"
    return None


# --- Python names ---------------------------------------------------------------------------
DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
PY_SPAN = re.compile(rf"({DOTTED})(\((.*)\))?(\s*->.*)?")
CAMEL = re.compile(r"[A-Z]\w*[a-z]\w*")
ALL_CAPS = re.compile(r"[A-Z][A-Z0-9_]*")
FILE_NAME = re.compile(r"\.(py|md|rst|txt|c|h|sh|patch|config|toml|json|cpio|img)$")
_FIELD = object()   # a field or instance attribute: it exists, but has no value to look into


@dataclass
class PythonIndex:
    """pyvmm as imported: its modules, its classes by name, and every bare name that
    a ``name()`` span may mean (module-level functions and classes, methods)."""

    modules: dict[str, ModuleType]
    classes: dict[str, list[type]] = field(default_factory=dict)
    callables: set[str] = field(default_factory=set)


def pyvmm_modules() -> dict[str, ModuleType]:
    """Every module and package of pyvmm, by file (pyvmm/pci has no __init__.py, so
    pkgutil would not find it); ``__main__`` modules run the program and are left out."""
    import pyvmm

    top = Path(pyvmm.__file__).parent
    names = {"pyvmm"}
    for f in top.rglob("*.py"):
        rel = f.relative_to(top.parent).with_suffix("")
        if "__pycache__" in rel.parts or rel.name == "__main__" or "_guest" in rel.parts:
            continue
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {name: importlib.import_module(name) for name in sorted(names)}


def build_index() -> PythonIndex:
    """Built from the live modules on every call, so that a monkeypatch shows."""
    index = PythonIndex(pyvmm_modules())
    for name, module in index.modules.items():
        for attr, obj in vars(module).items():
            if getattr(obj, "__module__", None) != name or not callable(obj):
                continue
            index.callables.add(attr)
            if inspect.isclass(obj):
                index.classes.setdefault(attr, []).append(obj)
                index.callables.update(m for m, v in vars(obj).items()
                                       if callable(v) or isinstance(v, (staticmethod, classmethod, property)))
    return index


def instance_attributes(cls: type) -> set[str]:
    """Names a class's own methods assign as ``self.name = ...``."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass.__module__.startswith("pyvmm"):
            try:
                source = inspect.getsource(klass)
            except (OSError, TypeError):
                continue
            names.update(re.findall(r"\bself\.(\w+)\s*(?::[^=\n]+)?=[^=]", source))
    return names


def lookup(obj: object, attr: str) -> object | None:
    """``obj.attr``; for a class also an annotated field or an attribute its methods
    set on ``self`` (these have no value to look further into)."""
    try:
        return getattr(obj, attr)
    except AttributeError:
        pass
    if inspect.isclass(obj) and (any(attr in vars(k).get("__annotations__", {}) for k in obj.__mro__)
                                 or attr in instance_attributes(obj)):
        return _FIELD
    return None


def resolves(obj: object, attrs: list[str]) -> bool:
    for attr in attrs:
        obj = lookup(obj, attr)
        if obj is None:
            return False
    return True


def resolve_pyvmm(index: PythonIndex, parts: list[str]) -> bool:
    for i in range(len(parts), 0, -1):
        module = index.modules.get(".".join(parts[:i]))
        if module is not None:
            return resolves(module, parts[i:])
    return False


@cache
def libc() -> ctypes.CDLL:
    return ctypes.CDLL(None)


@cache
def c_source_calls(root: Path) -> frozenset[str]:
    """Every name followed by ``(`` in the C sources and kernel patches of guest/."""
    names: set[str] = set()
    for pattern in ("**/*.c", "**/*.h", "patches/*.patch"):
        for f in (root / "guest").glob(pattern):
            if "build" not in f.relative_to(root / "guest").parts:
                names.update(re.findall(r"\b([A-Za-z_]\w*)\s*\(", f.read_text(errors="replace")))
    return frozenset(names)


def is_c_function(root: Path, name: str, args: str) -> bool:
    if re.fullmatch(r"[1-8][a-z]*", args.strip()):   # a manual page: write(2)
        return True
    if not name.startswith("_") and hasattr(libc(), name):
        return True
    return name in c_source_calls(root)


def name_problem(root: Path, index: PythonIndex, span: str) -> str | None:
    """None when ``span`` is no Python name (rules 1-6 above) or resolves."""
    if re.match(r"[-/$<~\"']", span) or re.search(r"[=*…:]", span) or FILE_NAME.search(span):
        return None
    m = PY_SPAN.fullmatch(span)
    if m is None:
        return None
    name, called, args = m.group(1), m.group(2) is not None, m.group(3) or ""
    parts = name.split(".")
    head = parts[0]
    if head == "pyvmm" and len(parts) > 1:
        ok = resolve_pyvmm(index, parts)
    elif ALL_CAPS.fullmatch(head):
        return None
    elif CAMEL.fullmatch(head):
        classes = index.classes.get(head, []) + [c for c in [getattr(builtins, head, None)] if c]
        ok = any(resolves(cls, parts[1:]) for cls in classes)
    elif len(parts) > 1:
        if f"pyvmm.{head}" not in index.modules:
            return None
        ok = resolve_pyvmm(index, ["pyvmm", *parts])
    elif not called:
        return None
    else:
        ok = head in index.callables or is_c_function(root, head, args)
    return None if ok else f"{span!r} names nothing in pyvmm"


# --- one document ---------------------------------------------------------------------------
def doc_problems(doc: Path, root: Path = REPO, index: PythonIndex | None = None) -> list[str]:
    """Every broken path, name and link of one markdown file, as 'file:line: problem'."""
    index = index or build_index()
    text = doc.read_text()
    rel = doc.relative_to(root)
    problems = []
    for span in code_spans(text):
        if is_repo_path(span.text):
            problem = path_problem(root, span.text)
        else:
            problem = name_problem(root, index, span.text)
        if problem:
            problems.append(f"{rel}:{span.line}: {problem}")
    for link in link_targets(text):
        problem = link_problem(root, doc, link.text)
        if problem:
            problems.append(f"{rel}:{link.line}: {problem}")
    return problems


def doc_files(root: Path = REPO) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


# --- the whole project ----------------------------------------------------------------------
def project_files(root: Path = REPO) -> list[Path]:
    """The text files of the project (build products, caches and binaries left out)."""
    out = []
    for top in PROJECT:
        start = root / top
        candidates = [start] if start.is_file() else sorted(start.rglob("*")) if start.is_dir() else []
        for f in candidates:
            rel = f.relative_to(root).as_posix()
            if (not f.is_file() or "__pycache__" in f.parts
                    or any(rel == g or rel.startswith(g + "/") for g in GENERATED)):
                continue
            if b"\0" not in f.read_bytes()[:8192]:
                out.append(f)
    return out


@dataclass(frozen=True)
class Hit:
    path: str
    line: int
    text: str
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: mentions {self.what}: {self.text.strip()}"


def forbidden_mentions(root: Path = REPO) -> list[Hit]:
    hits = []
    for f in project_files(root):
        rel = f.relative_to(root).as_posix()
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            hits += [Hit(rel, n, line, what) for what, rx in FORBIDDEN.items() if rx.search(line)]
    return hits


def being_fixed_elsewhere(path: str, text: str) -> str | None:
    return next((fix for (p, piece), fix in BEING_FIXED_ELSEWHERE.items()
                 if p == path and piece in text), None)


CITE_NAMED = re.compile(r'docs/([\w-]+\.md) "([^"\n]+)"')
CITE_NUMBERED = re.compile(r"docs/(vhost-user-dax\.md),? (?:sections? |§)?"
                           r"(\d+(?:\.\d+)?(?:(?:-| and |, )\d+(?:\.\d+)?)*)")
DOC_MENTION = re.compile(r"\bdocs/([a-z0-9][a-z0-9_-]*\.md)")


def section_numbers(doc: Path) -> set[str]:
    return {m.group(1) for h in headings(doc.read_text()) if (m := re.match(r"(\d+(?:\.\d+)?)\.? ", h))}


def citation_problems(root: Path = REPO) -> list[str]:
    problems = []
    for f in project_files(root):
        rel = f.relative_to(root).as_posix()
        text = f.read_text(errors="replace")

        def where(pos: int) -> str:
            return f"{rel}:{text.count(chr(10), 0, pos) + 1}"

        for m in DOC_MENTION.finditer(text):
            if not (root / "docs" / m.group(1)).is_file():
                problems.append(f"{where(m.start())}: docs/{m.group(1)} does not exist")
        for m in CITE_NAMED.finditer(text):
            doc = root / "docs" / m.group(1)
            if doc.is_file() and m.group(2) not in headings(doc.read_text()):
                problems.append(f'{where(m.start())}: docs/{m.group(1)} has no section "{m.group(2)}"')
        for m in CITE_NUMBERED.finditer(text):
            doc = root / "docs" / m.group(1)
            missing = set(re.findall(r"\d+(?:\.\d+)?", m.group(2))) - section_numbers(doc)
            if doc.is_file() and missing:
                problems.append(f"{where(m.start())}: docs/{m.group(1)} has no section "
                                f"{', '.join(sorted(missing))}")
    return problems


def parser_options() -> set[str]:
    """Every long option of ``pyvmm`` (all sub-commands) and ``pyvmm-virtiofsd``."""
    from pyvmm.cli import build_parser
    from pyvmm.virtiofsd.cli import build_parser as build_virtiofsd_parser

    options: set[str] = set()

    def walk(parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            options.update(o for o in action.option_strings if o.startswith("--"))
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)

    walk(build_parser())
    walk(build_virtiofsd_parser())
    return options


# --- the tests ------------------------------------------------------------------------------
def _split_known(problems: list[str], path: str) -> tuple[list[str], list[str]]:
    known = [p for p in problems if being_fixed_elsewhere(path, p)]
    return [p for p in problems if p not in known], known


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_documented_paths_names_and_links_exist(doc):
    rel = doc.relative_to(REPO).as_posix()
    unknown, known = _split_known(doc_problems(doc), rel)
    assert not unknown, "\n".join(unknown)
    if known:
        pytest.xfail("being fixed elsewhere: " + "; ".join(known))


def test_no_file_points_at_the_team_documents():
    hits = forbidden_mentions()
    unknown = [h for h in hits if not being_fixed_elsewhere(h.path, h.text)]
    assert not unknown, "a clone has none of these:\n" + "\n".join(map(str, unknown))
    if hits:
        pytest.xfail("being fixed elsewhere: " + "; ".join(map(str, hits)))


def test_expected_failures_are_still_real():
    texts = {p: (REPO / p).read_text() for p, _ in BEING_FIXED_ELSEWHERE}
    fixed = [f"{p}: {piece!r}" for p, piece in BEING_FIXED_ELSEWHERE if piece not in texts[p]]
    assert not fixed, "fixed now, remove from BEING_FIXED_ELSEWHERE: " + ", ".join(fixed)


def test_citations_of_the_docs_name_existing_sections():
    problems = citation_problems()
    assert not problems, "\n".join(problems)


def test_cli_reference_has_the_exit_status_table():
    from pyvmm.status import EXIT_STATUS_TABLE

    assert EXIT_STATUS_TABLE in (REPO / "docs" / "cli.md").read_text()


def test_cli_reference_names_exactly_the_options_the_parsers_define():
    text = (REPO / "docs" / "cli.md").read_text()
    documented = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*(?![\w-])", text))
    defined = parser_options()
    assert not documented - defined, f"documented but not defined: {sorted(documented - defined)}"
    assert not defined - documented, f"defined but not documented: {sorted(defined - documented)}"


def test_a_missing_name_is_reported(monkeypatch):
    import pyvmm.vcpu

    walkthrough = REPO / "docs" / "walkthrough.md"
    assert not [p for p in doc_problems(walkthrough) if "fixup_instruction" in p]
    monkeypatch.delattr(pyvmm.vcpu, "fixup_instruction")
    assert [p for p in doc_problems(walkthrough) if "'fixup_instruction()' names nothing" in p]


def test_a_renamed_method_fails_this_test_in_a_scratch_copy(tmp_path):
    """Rename ``DaxWindow.file_io`` in a copy of the repository: the walkthrough,
    which names it, must then fail this very test there."""
    copy = tmp_path / "repo"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", ".pytest_cache", "build", "results", "*.egg-info"))
    dax = copy / "pyvmm" / "devices" / "virtio" / "dax_window.py"
    source = dax.read_text()
    assert source.count("def file_io(") == 1
    dax.write_text(source.replace("def file_io(", "def copy_with_file("))
    env = {**os.environ, "PYTHONPATH": str(copy)}
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/test_docs.py", "-k", "documented_paths_names_and_links_exist and walkthrough"],
                       cwd=copy, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "docs/walkthrough.md" in p.stdout and "'DaxWindow.file_io()' names nothing in pyvmm" in p.stdout, p.stdout


def test_a_citation_of_a_missing_section_is_reported(tmp_path):
    d = "docs/"   # spelled apart so that this file cites nothing itself
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "pvm.md").write_text("# PVM\n\n## Speed\n")
    (tmp_path / "docs" / "vhost-user-dax.md").write_text("# DAX\n\n## 1. Header\n\n### 1.1 Flags\n")
    (tmp_path / "pyvmm").mkdir()
    (tmp_path / "pyvmm" / "x.py").write_text(f'# {d}pvm.md "Speed", {d}pvm.md "Sped"\n'
                                             f"# {d}vhost-user-dax.md 1.1, {d}vhost-user-dax.md 1.3\n"
                                             f"# {d}gone.md\n")
    assert sorted(citation_problems(tmp_path)) == [
        f'pyvmm/x.py:1: {d}pvm.md has no section "Sped"',
        f"pyvmm/x.py:2: {d}vhost-user-dax.md has no section 1.3",
        f"pyvmm/x.py:3: {d}gone.md does not exist",
    ]
