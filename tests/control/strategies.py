"""Hypothesis strategies shared by the control's fuzz suites (tests/fuzz/)."""
from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

# Scalars a hostile JSON document can hold; Python's json reads NaN, Infinity
# and integers of any size (up to 4300 digits) without complaint.
SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.sampled_from([0, -1, 2**31, 2**32 - 1, 2**63, 2**64, 10**300]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(["", "\n", "\ud800", "é" * 3, "nodekey:" + "00" * 32]))

JSON = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)


def dumps(value: Any) -> bytes:
    """JSON text as a careless writer produces it: NaN/Infinity tokens, lone surrogates escaped."""
    return json.dumps(value).encode()


@st.composite
def mutated(draw: st.DrawFn, base: Any, depth: int = 4) -> Any:
    """`base` with one spot changed: a value replaced by any JSON, a key dropped
    or added, a dict turned into a list (or the reverse)."""
    if depth == 0 or not isinstance(base, (dict, list)) or not base or draw(st.integers(0, 3)) == 0:
        return draw(st.one_of(JSON, st.just([base]), st.just({"x": base})))
    if isinstance(base, dict):
        key = draw(st.sampled_from(sorted(base)))
        out = dict(base)
        action = draw(st.sampled_from(["change", "drop", "add"]))
        if action == "drop":
            del out[key]
        elif action == "add":
            out[draw(st.text(max_size=10))] = draw(JSON)
        else:
            out[key] = draw(mutated(base[key], depth - 1))
        return out
    i = draw(st.integers(0, len(base) - 1))
    return base[:i] + [draw(mutated(base[i], depth - 1))] + base[i + 1:]
