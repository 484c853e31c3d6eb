"""Raw event bytes straight to ledger row tuples: the materializer's hot path.

``decode_rows(value, topic, partition, offset)`` returns exactly
``(name, row_tuples_for_event(name, rec, topic, partition, offset, value))`` with
``name, rec = default_codec().decode(value)``, and raises the same ``DecodeError`` for a value that
does not decode. ``py_decode_rows`` is that composition, the reference.

The C build (ledger/_rowdecode.c, compiled on first use like eventlog's verifier fast path) walks
the Avro body of events written with a current schema and builds the rows itself, following a
small program per schema made here from the schema and ``_COLUMNS`` (which mirrors the ``_p_*``
builders of ledger/tables.py). Whatever it does not handle (older writer schemas, policy updates
with their lineage rows, truncated or malformed values, ...) it hands to ``py_decode_rows``.
At import every program is checked against the reference on sample events; a program that
disagrees is dropped with a warning, so a change to tables.py cannot silently change the rows.

``check_rows(records, start, heads, changed, offsets, rows, topic_of, seen) -> int`` (None without
the C build or without libcrypto's SHA256_* functions) is the common case of
``ledger.materialize.check_batch`` in C: from ``records[start]`` on, each record that decodes in C,
hashes right, sits on its event type's topic under its chain's key and is its chain's next event is
recorded as check_batch records it (offsets, heads, changed, seen, rows); it stops at the first
record that is anything else, touching nothing for it, and returns that record's index.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import schemas as schema_files
from eventlog.codec import default_codec
from eventlog.native import build_extension, sha256_functions

from .tables import SCHEMA_TABLE, TABLES, row_tuples_for_event

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("_rowdecode.c")

__all__ = ["decode_rows", "decode_rows_native", "py_decode_rows", "NATIVE", "native_schemas", "native_counts",
           "check_rows"]


def py_decode_rows(value: bytes, topic: str, partition: int, offset: int) -> tuple[str, list[tuple[str, tuple]]]:
    """The reference: the codec's decode, then ``row_tuples_for_event``."""
    name, rec = default_codec().decode(value)
    return name, row_tuples_for_event(name, rec, topic, partition, offset, value)


# ---- what each row column holds (mirrors ledger/tables.py) -------------------------------------
# ("field", f): the decoded value of field f (a scalar); ("json", f): _json(value); ("floats", f):
# _floats(value); ("hashes", f): b"".join(value); ("protected", f, "json"|"refs"): _protected's two
# columns; ("sum", f, g): sum(item[g] for item in value); TOPIC / PARTITION / OFFSET / EVENT_HASH /
# RAW: where the event was read and its bytes; None: a None column.
TOPIC, PARTITION, OFFSET, EVENT_HASH, RAW = "topic", "partition", "offset", "event_hash", "raw"


def _fields(*names: str) -> tuple:
    return tuple(("field", n) for n in names)


def _protected(name: str) -> tuple:
    return (("protected", name, "json"), ("protected", name, "refs"))


_HEADER = (("field", "event_id"), TOPIC, PARTITION, OFFSET) + _fields(
    "chain_id", "seq", "run_id", "event_type", "produced_at", "producer_id", "data_classification",
    "retention_expiry", "feature_schema_version", "policy_version", "rule_version") + (
    ("hashes", "source_event_hashes"), ("field", "prev_event_hash"), EVENT_HASH, RAW)

_COLUMNS: dict[str, tuple] = {
    "run_started": _fields("env_id", "env_version", "seed", "config_hash", "config_json")
    + (("json", "agents"), ("json", "state_space"), ("field", "episodes_planned")) + (None,) * 6,
    "run_finished": (None,) * 8 + _fields("status", "reason", "episodes", "steps", "mean_return")
    + (("json", "chain_heads"),),
    "env_state": _fields("episode", "step") + (("floats", "state"), ("floats", "collapsed_state"),
                                               ("json", "flags")) + _protected("protected_fields"),
    "agent_observation": _fields("episode", "step", "agent_id") + (("floats", "observation"),
                                                                   ("json", "action_mask"))
    + _protected("protected_fields"),
    "joint_action": _fields("episode", "step") + (("json", "actions"), ("floats", "joint_vector"),
                                                  ("sum", "actions", "reward")),
    "credit_assignment": _fields("episode", "step", "joint_action_hash", "raw_reward", "global_reward")
    + (("json", "penalties"), ("json", "shares")),
    "fairness_metrics": _fields("episode", "window", "window_start", "window_end")
    + (("json", "metrics"), ("json", "agent_metrics")),
    "audit_checkpoint": _fields("checked_topic", "checked_chain_id", "first_seq", "last_seq", "prev_head_hash",
                                "head_event_hash", "merkle_root", "signer_key_id", "signature"),
    "compliance_deletion": _fields("request_id", "requester", "legal_basis", "namespace", "subject_ref")
    + (("json", "actions"),),
    "dead_letter": _fields("source_topic", "source_partition", "source_offset", "source_key", "error_kind",
                           "reason", "consumer", "payload", "payload_sha256"),
    # policy_update: its lineage rows are left to the reference
}

# numbers shared with _rowdecode.c
T_LONG, T_INT, T_STRING, T_BYTES, T_FIXED, T_FLOAT, T_DOUBLE, T_BOOL, T_ARRAY, T_RECORD = range(1, 11)
A_SKIP, A_SCALAR, A_JSON, A_FLOATS, A_HASHES, A_PROTECTED, A_JSON_SUM = range(1, 8)
_SPECIAL = {None: -1, TOPIC: -2, PARTITION: -3, OFFSET: -4, EVENT_HASH: -5, RAW: -6}
_PRIMITIVE = {"long": T_LONG, "int": T_INT, "string": T_STRING, "bytes": T_BYTES, "float": T_FLOAT,
              "double": T_DOUBLE, "boolean": T_BOOL}


class Unsupported(ValueError):
    """A schema construct the C walker does not know (union, map, enum, recursion, ...)."""


class _TypeCoder:
    """Avro type -> flat int code; named types expand inline; record keys go to ``keys``."""

    def __init__(self, namespace: str):
        self.named: dict[str, dict] = {}
        self.keys: list[str] = []
        self._key_index: dict[str, int] = {}
        self.ns = namespace

    def code(self, t, ns: str | None = None, depth: int = 0) -> list[int]:
        ns = self.ns if ns is None else ns
        if depth > 20:
            raise Unsupported("nesting too deep (recursive type?)")
        if isinstance(t, str):
            if t in _PRIMITIVE:
                return [_PRIMITIVE[t]]
            full = t if "." in t else f"{ns}.{t}"
            ref = self.named.get(full) or self.named.get(t)
            if ref is None:
                raise Unsupported(f"unknown named type {t!r}")
            return self.code(ref, ns, depth + 1)
        if isinstance(t, list):
            raise Unsupported("union")
        kind = t["type"]
        if kind in _PRIMITIVE and len(t) == 1:
            return [_PRIMITIVE[kind]]
        if kind == "fixed":
            self._register(t, ns)
            return [T_FIXED, int(t["size"])]
        if kind == "array":
            item = self.code(t["items"], ns, depth + 1)
            return [T_ARRAY, len(item)] + item
        if kind == "record":
            full = self._register(t, ns)
            rns = full.rpartition(".")[0]
            out = [T_RECORD, len(t["fields"])]
            for f in t["fields"]:
                out.append(self._key(f["name"]))
                out += self.code(f["type"], rns, depth + 1)
            return out
        raise Unsupported(f"type {kind!r}")

    def _register(self, t: dict, ns: str) -> str:
        space = t.get("namespace", ns)
        full = t["name"] if "." in t["name"] else f"{space}.{t['name']}"
        self.named[full] = t
        self.named.setdefault(t["name"], t)
        return full

    def _key(self, name: str) -> int:
        text = json.dumps(name) + ":"
        if text not in self._key_index:
            self._key_index[text] = len(self.keys)
            self.keys.append(text)
        return self._key_index[text]


def compile_program(name: str, schema: dict, fingerprint: bytes) -> tuple:
    """The program ``_rowdecode.set_programs`` takes for schema ``name``; Unsupported if it cannot."""
    table = SCHEMA_TABLE[name]
    columns = _HEADER + _COLUMNS[name]
    if len(columns) != len(TABLES[table].columns):
        raise Unsupported(f"{name}: {len(columns)} columns described, table {table} has {len(TABLES[table].columns)}")
    uses: dict[str, set] = {}
    captures: dict[str, str] = {}
    for col in columns:
        if isinstance(col, tuple):
            kind = col[0]
            uses.setdefault(col[1], set()).add(kind)
            if kind == "sum":
                captures[col[1]] = col[2]
            if kind == "protected":
                captures[col[1]] = "subject_ref"
    coder = _TypeCoder(schema.get("namespace", ""))
    code: list[int] = [len(schema["fields"])]
    slot_of: dict[tuple, int] = {}
    nslots = 0
    seen = set()
    for f in schema["fields"]:
        fname, tcode = f["name"], coder.code(f["type"])
        seen.add(fname)
        use = uses.get(fname, set())
        if not use:
            code += [A_SKIP] + tcode
        elif use == {"field"}:
            if tcode[0] in (T_ARRAY, T_RECORD):
                raise Unsupported(f"{name}.{fname}: a scalar column of a composite type")
            code += [A_SCALAR] + tcode
            slot_of[("field", fname)] = nslots
            nslots += 1
        elif use == {"json"}:
            code += [A_JSON] + tcode
            slot_of[("json", fname)] = nslots
            nslots += 1
        elif use == {"floats"}:
            if tcode != [T_ARRAY, 1, T_FLOAT]:
                raise Unsupported(f"{name}.{fname}: floats column of a non-float array")
            code += [A_FLOATS] + tcode
            slot_of[("floats", fname)] = nslots
            nslots += 1
        elif use == {"hashes"}:
            if tcode[:3] != [T_ARRAY, 2, T_FIXED]:
                raise Unsupported(f"{name}.{fname}: hashes column of a non-fixed array")
            code += [A_HASHES] + tcode
            slot_of[("hashes", fname)] = nslots
            nslots += 1
        elif use in ({"protected"}, {"json", "sum"}, {"sum"}):
            items = _record_items(f["type"], coder)
            cap = [g["name"] for g in items["fields"]].index(captures[fname])
            code += [A_PROTECTED if use == {"protected"} else A_JSON_SUM, cap] + tcode
            if use == {"protected"}:
                slot_of[("protected", fname, "json")] = nslots
                slot_of[("protected", fname, "refs")] = nslots + 1
            else:
                slot_of[("json", fname)] = nslots
                slot_of[("sum", fname, captures[fname])] = nslots + 1
            nslots += 2
        else:
            raise Unsupported(f"{name}.{fname}: used as {sorted(use)}")
    missing = set(uses) - seen
    if missing:
        raise Unsupported(f"{name}: columns name fields not in the schema: {sorted(missing)}")
    cols = [_SPECIAL[c] if not isinstance(c, tuple) else slot_of[c] for c in columns]
    return (fingerprint, name, table, tuple(code), tuple(coder.keys), tuple(cols), nslots)


def _record_items(t, coder: _TypeCoder) -> dict:
    items = t["items"] if isinstance(t, dict) and t.get("type") == "array" else None
    if isinstance(items, str):
        items = coder.named.get(items) or coder.named.get(f"{coder.ns}.{items}")
    if not isinstance(items, dict) or items.get("type") != "record":
        raise Unsupported("expected an array of records")
    return items


# ---- sample events for the import-time self-check ---------------------------------------------

def _sample(t, named: dict, ns: str, variant: int, n: list):
    """A value of Avro type t, each field different: variant 0 has two items per array and non-ASCII
    text, variant 1 empty arrays."""
    n[0] += 1
    k = n[0]
    if isinstance(t, str):
        prim = {"long": -(1 << 40) - k, "int": k, "string": f"a\"\\\n\u00e9\u20ac\U0001f600\x01{k}",
                "bytes": bytes([k % 256, 255]), "boolean": bool(k % 2), "float": 0.1 * k, "double": -2.5e-300 * k}
        if t in prim:
            return prim[t]
        full = t if "." in t else f"{ns}.{t}"
        return _sample(named.get(full) or named[t], named, ns, variant, n)
    kind = t["type"]
    if kind == "fixed":
        named[t["name"] if "." in t["name"] else f"{t.get('namespace', ns)}.{t['name']}"] = t
        named.setdefault(t["name"], t)
        return bytes((k + i) % 256 for i in range(t["size"]))
    if kind == "array":
        items = [_sample(t["items"], named, ns, variant, n) for _ in range(2)]  # registers named types
        return [] if variant else items
    if kind == "record":
        space = t.get("namespace", ns)
        full = t["name"] if "." in t["name"] else f"{space}.{t['name']}"
        named[full] = t
        named.setdefault(t["name"], t)
        rns = full.rpartition(".")[0]
        return {f["name"]: _sample(f["type"], named, rns, variant, n) for f in t["fields"]}
    return _sample(kind, named, ns, variant, n)


def _self_check(mod, name: str) -> bool:
    codec = default_codec()
    schema = schema_files.load(name)
    for variant in (0, 1):
        rec = _sample(schema, {}, schema.get("namespace", ""), variant, [0])
        value = codec.encode(name, rec)
        got = mod.decode_rows_native(value, "t", 0, 1)
        if got is None or not same_rows(got, py_decode_rows(value, "t", 0, 1)):
            return False
    return True


def same_rows(a, b) -> bool:
    """Equal, with equal types everywhere, NaN equal to NaN and -0.0 told from 0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same_rows(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    return a == b


# ---- loading ------------------------------------------------------------------------------------

def _load():
    mod = build_extension(SOURCE, "_rowdecode", purpose="the ledger's row decoding")
    if mod is None:
        return None, ()
    codec = default_codec()
    programs = []
    for name, schema in schema_files.current().items():
        if name not in _COLUMNS:
            continue
        try:
            programs.append(compile_program(name, schema, codec.fingerprint(name)))
        except Unsupported as exc:
            log.warning("ledger row decoding: %s is left to the Python path (%s)", name, exc)
    mod.set_programs(programs, py_decode_rows)
    good = []
    for prog in programs:
        if _self_check(mod, prog[1]):
            good.append(prog)
        else:
            log.warning("ledger row decoding: the C rows of %s differ from ledger.tables; that schema is left to "
                        "the Python path (update ledger/fastrows.py _COLUMNS to match tables.py)", prog[1])
    if len(good) != len(programs):
        mod.set_programs(good, py_decode_rows)
    try:
        mod.set_sha256(*sha256_functions())
    except Exception as exc:  # noqa: BLE001 - check_batch then keeps its Python loop
        log.warning("ledger chain checks in C unavailable (no usable libcrypto SHA-256: %s); "
                    "ledger.materialize.check_batch uses its Python loop", exc)
        mod.has_sha256 = False
    else:
        mod.has_sha256 = True
    return mod, good


try:
    _native, programs = _load()
except Exception as exc:  # noqa: BLE001 - any failure falls back to the reference implementation
    log.warning("ledger row decoding fast path unavailable (%s); using the pure-Python path", exc)
    _native, programs = None, []
native_schemas: tuple[str, ...] = tuple(sorted(p[1] for p in programs))  # decoded in C when current

NATIVE = _native is not None
if NATIVE:
    decode_rows = _native.decode_rows
    decode_rows_native = _native.decode_rows_native
    native_counts = _native.counts
    check_rows = _native.check_rows if _native.has_sha256 else None
else:
    check_rows = None
    decode_rows = py_decode_rows

    def decode_rows_native(value, topic, partition, offset):
        """Without the C build every event takes the Python path."""
        return None

    def native_counts() -> tuple[int, int]:
        return (0, 0)
