"""Markers for the fuzzers: valid ones of guest 101 (the corpus' shape), with random parts replaced."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

from tests.corpus.generate import CONTAINER_STACK, SYSTEMD_STACK, doc

# any JSON value, NaN and Infinity included (Python's json writes them as bare words)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    | st.sampled_from([1, 0, -1, 10**15, 10**15 - 1, 1e10, 9999999999.999, 1e300, 10**400, "", "db", "/srv/db", "app",
                       "vzdump-hook", "stopped"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _paths(d: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(d, dict):
        for k, v in d.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated_docs(draw: st.DrawFn) -> dict[str, Any]:
    """A valid marker document (its stack of kind compose, systemd or container) with 0 to 3 values
    replaced (or keys removed)."""
    d = doc()
    kind = draw(st.sampled_from(["compose", "systemd", "container"]))
    if kind != "compose":
        d["stacks"] = [json.loads(json.dumps(SYSTEMD_STACK if kind == "systemd" else CONTAINER_STACK))]
    for _ in range(draw(st.integers(0, 3))):
        paths = [p for p in _paths(d) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        obj: Any = d
        for k in path[:-1]:
            obj = obj[k]
        if isinstance(obj, dict) and draw(st.booleans()) and draw(st.booleans()):
            del obj[path[-1]]
        else:
            obj[path[-1]] = draw(json_values)
    return d


@st.composite
def marker_bytes(draw: st.DrawFn) -> bytes:
    """Bytes near a valid marker: a mutated document in one of several layouts, maybe byte-edited."""
    d = draw(mutated_docs())
    layout = draw(st.sampled_from(["indent", "compact", "ascii-off"]))
    text = (json.dumps(d, indent=1) if layout == "indent"
            else json.dumps(d, separators=(",", ":"), ensure_ascii=layout != "ascii-off"))
    data = text.encode("utf-8", "surrogatepass")
    for _ in range(draw(st.integers(0, 2))):
        pos = draw(st.integers(0, len(data)))
        cut = draw(st.integers(0, 3))
        ins = draw(st.binary(max_size=4) | st.sampled_from([b'"', b"\\", b",", b"}", b"]", b":", b"\\u0000", b"\\ud800",
                                                            b"e9", b"\n", b'"x": 1,']))
        data = data[:pos] + ins + data[pos + cut:]
    return data
