"""Hypothesis strategies that generate records for an Avro schema (no unions, maps or enums)."""
from __future__ import annotations

from hypothesis import strategies as st

_names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)


def records(schema: dict):
    named: dict[str, dict] = {}
    return _strategy(schema, named, schema.get("namespace", ""))


def _strategy(t, named, ns):
    if isinstance(t, str):
        prim = {
            "long": st.integers(-(1 << 63), (1 << 63) - 1),
            "int": st.integers(-(1 << 31), (1 << 31) - 1),
            "string": _names,
            "bytes": st.binary(max_size=40),
            "boolean": st.booleans(),
            "float": st.floats(width=32, allow_nan=False),
            "double": st.floats(allow_nan=False),
        }.get(t)
        if prim is not None:
            return prim
        full = t if "." in t else f"{ns}.{t}"
        return _strategy(named.get(full) or named[t], named, ns)
    kind = t["type"]
    if kind in ("long", "int", "string", "bytes", "boolean", "float", "double"):
        return _strategy(kind, named, ns)
    if kind == "fixed":
        _register(t, named, ns)
        return st.binary(min_size=t["size"], max_size=t["size"])
    if kind == "array":
        return st.lists(_strategy(t["items"], named, ns), max_size=4)
    if kind == "record":
        full = _register(t, named, ns)
        rns = full.rpartition(".")[0]
        return st.fixed_dictionaries({f["name"]: _strategy(f["type"], named, rns) for f in t["fields"]})
    raise ValueError(kind)


def _register(t, named, ns):
    space = t.get("namespace", ns)
    full = t["name"] if "." in t["name"] else f"{space}.{t['name']}"
    named[full] = t
    named.setdefault(t["name"], t)
    return full
