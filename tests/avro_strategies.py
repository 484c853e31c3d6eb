"""Hypothesis strategies that generate records for an Avro schema (no unions, maps or enums).

``records(schema)`` covers every value a field can hold. Callers that want harder values pass
``prims`` (strategies for primitive types, over the defaults), ``extra(field, t)`` (a strategy mixed
into a fixed field's values, e.g. repeated subject refs) and ``float_list_size``.
"""
from __future__ import annotations

from typing import Callable

from hypothesis import strategies as st

_names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
PRIMS = {
    "long": st.integers(-(1 << 63), (1 << 63) - 1),
    "int": st.integers(-(1 << 31), (1 << 31) - 1),
    "string": _names,
    "bytes": st.binary(max_size=40),
    "boolean": st.booleans(),
    "float": st.floats(width=32, allow_nan=False),
    "double": st.floats(allow_nan=False),
}


def records(schema: dict, *, prims: dict | None = None, extra: Callable | None = None, float_list_size: int = 4):
    opts = ({**PRIMS, **(prims or {})}, extra, float_list_size)
    return _strategy(schema, {}, schema.get("namespace", ""), None, opts)


def _strategy(t, named, ns, field, opts):
    prims, extra, float_list_size = opts
    if isinstance(t, str):
        if t in prims:
            return prims[t]
        full = t if "." in t else f"{ns}.{t}"
        return _strategy(named.get(full) or named[t], named, ns, field, opts)
    kind = t["type"]
    if kind in prims:
        return prims[kind]
    if kind == "fixed":
        _register(t, named, ns)
        exact = st.binary(min_size=t["size"], max_size=t["size"])
        more = extra(field, t) if extra is not None else None
        return st.one_of(exact, more) if more is not None else exact
    if kind == "array":
        items = _strategy(t["items"], named, ns, field, opts)
        return st.lists(items, max_size=float_list_size if t["items"] == "float" else 4)
    if kind == "record":
        full = _register(t, named, ns)
        rns = full.rpartition(".")[0]
        return st.fixed_dictionaries({f["name"]: _strategy(f["type"], named, rns, f["name"], opts)
                                      for f in t["fields"]})
    raise ValueError(kind)


def _register(t, named, ns):
    space = t.get("namespace", ns)
    full = t["name"] if "." in t["name"] else f"{space}.{t['name']}"
    named[full] = t
    named.setdefault(t["name"], t)
    return full


def old_env_state_value(state: list[float]) -> tuple[bytes, bytes]:
    """(value, its writer's fingerprint): an env.state event written with the oldest schema version
    (``env_state.v0``, before ``flags``), for tests of readers meeting an older writer."""
    import io

    import fastavro

    import schemas
    from eventlog.codec import MAGIC, Codec

    old = schemas.history()["env_state.v0"]
    record = {f["name"]: None for f in old["fields"]}
    record.update(prev_event_hash=bytes(32), seq=3, chain_id="c", event_id="e", event_type="env.state", run_id="r",
                  produced_at=1, producer_id="p", data_classification="internal", retention_expiry=2,
                  feature_schema_version="1", policy_version="", rule_version="", source_event_hashes=[],
                  episode=1, step=2, state=state, collapsed_state=[], protected_fields=[], event_hash=bytes(32))
    body = io.BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(old), record)
    fingerprint = Codec({"env_state": old}).fingerprint("env_state")
    return MAGIC + fingerprint + body.getvalue(), fingerprint
