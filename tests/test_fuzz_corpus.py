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
