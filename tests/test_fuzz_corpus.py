"""Every fuzz target's corpus (fuzz/corpus/<target>/) replayed through its entry
function, without atheris: the seeds and every crash a fuzzer found stay fixed.

``make fuzz`` runs the targets under atheris (docs/testing.md, "Fuzzing").
"""

from __future__ import annotations

import os
import sys

import pytest

FUZZ_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fuzz")
sys.path.insert(0, FUZZ_DIR)
import fuzzing  # noqa: E402

CASES = [(name, path) for name in fuzzing.TARGETS for path in fuzzing.corpus_files(name)]


def test_every_target_has_a_corpus():
    assert sorted(fuzzing.TARGETS) == sorted(
        f[:-3] for f in os.listdir(FUZZ_DIR) if f.endswith(".py") and f != "fuzzing.py")
    for name in fuzzing.TARGETS:
        assert fuzzing.corpus_files(name), f"fuzz/corpus/{name}/ is empty"


_targets: dict = {}


@pytest.mark.parametrize("name, path", CASES,
                         ids=[f"{n}/{os.path.basename(p)}" for n, p in CASES])
def test_corpus_replays(name, path):
    if name not in _targets:
        _targets[name] = fuzzing.load_target(name)
    with open(path, "rb") as f:
        _targets[name].fuzz_one(f.read())


def test_a_logged_bug_or_a_dead_thread_fails_the_input():
    import logging
    import threading

    with pytest.raises(AssertionError, match="logged a bug"):
        with fuzzing.checked():
            try:
                raise KeyError("a bug")
            except KeyError:
                logging.getLogger("pyvmm.x").exception("caught")
    with pytest.raises(AssertionError, match="ZeroDivisionError"):
        with fuzzing.checked():
            t = threading.Thread(target=lambda: 1 / 0)
            t.start()
            t.join()
    with fuzzing.checked():     # a refusal (OSError) is not a bug
        try:
            raise OSError(22, "refused")
        except OSError:
            logging.getLogger("pyvmm.x").exception("refused")


def test_input_reader_pads_with_zeros():
    inp = fuzzing.Input(b"\x01\x02")
    assert (inp.u16(), inp.u32(), len(inp)) == (0x0201, 0, 0)
