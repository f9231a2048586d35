"""Helpers for the device-state tests: a JSON round trip and random damage to a saved dict.

``mutated(draw, state)`` returns a deep copy of ``state`` with one random change at
a random place: a value replaced by any JSON value, an integer or string nudged,
a key or list item removed, an unknown key or a duplicate item added.  A
``restore_state`` must answer every such dict with success or ``ValueError``.
"""

from __future__ import annotations

import copy
import json

from hypothesis import strategies as st

HEXISH = ["0x0", "0x1", "-0x1", "0xff", "0x100", "0xffff", "0x10000", "0xffffffffffffffff",
          "0x10000000000000000", "", "00", "0", "zz", "0x", "ff" * 300]
LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                   st.sampled_from(HEXISH))
VALUES = st.recursive(LEAVES, lambda kids: st.lists(kids, max_size=3)
                      | st.dictionaries(st.text(max_size=6), kids, max_size=3), max_leaves=6)


def through_json(state: dict) -> dict:
    """What a restore reads back from the file: every value as JSON gives it."""
    return json.loads(json.dumps(state))


def _places(obj, where=()):
    yield where
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _places(v, where + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _places(v, where + (i,))


def _nudged(draw, value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + draw(st.sampled_from([-1, 1, 1 << 16, 1 << 32, -(1 << 40), 1 << 64]))
    if isinstance(value, str):
        how = draw(st.sampled_from(["drop", "add0", "addff", "char", "hexup", "empty"]))
        if how == "drop":
            return value[:-1]
        if how == "add0":
            return value + "0"
        if how == "addff":
            return value + "ff"
        if how == "hexup" and value.startswith("0x"):
            return hex(int(value, 16) + draw(st.sampled_from([1, 0x100, 1 << 32, 1 << 64])))
        if how == "char" and value:
            i = draw(st.integers(0, len(value) - 1))
            return value[:i] + draw(st.sampled_from("0fFgx -")) + value[i + 1:]
        return ""
    return draw(VALUES)


def mutated(draw, state: dict) -> dict:
    data = copy.deepcopy(state)
    where = draw(st.sampled_from(list(_places(data))))
    if not where:
        if draw(st.booleans()):
            return draw(VALUES)
        data["unknown"] = draw(VALUES)
        return data
    parent = data
    for key in where[:-1]:
        parent = parent[key]
    key = where[-1]
    how = draw(st.sampled_from(["replace", "nudge", "remove", "insert"]))
    if how == "replace":
        parent[key] = draw(VALUES)
    elif how == "nudge":
        parent[key] = _nudged(draw, parent[key])
    elif how == "remove":
        del parent[key]
    elif isinstance(parent, list):
        parent.insert(key, copy.deepcopy(parent[key]))
    else:
        parent["x-" + str(key)] = copy.deepcopy(parent[key])
    return data
