"""Compiled Avro binary encoders: one generated Python function per schema.

fastavro's generic writer costs ~17 µs for a joint action; a function generated from the schema
costs a few µs, which the produce path needs. The output is byte-for-byte what fastavro writes
(tests check it on every schema, with Hypothesis): arrays as one block, fields in schema order.
Schemas here use no unions, maps or enums, and the compiler refuses them.
"""
from __future__ import annotations

import struct
from typing import Callable

_FLOAT = struct.Struct("<f").pack
_DOUBLE = struct.Struct("<d").pack
_MIN_LONG, _MAX_LONG = -(1 << 63), (1 << 63) - 1
_MIN_INT, _MAX_INT = -(1 << 31), (1 << 31) - 1


class EncodeError(ValueError):
    """A record does not fit its schema."""


def _uvarint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL = 1 << 14
_SMALL_LONGS = [_uvarint(((i << 1) ^ (i >> 63)) & 0xFFFFFFFFFFFFFFFF) for i in range(-_SMALL, _SMALL)]


def long_bytes(n: int) -> bytes:
    """Zigzag varint of a long."""
    if -_SMALL <= n < _SMALL:
        return _SMALL_LONGS[n + _SMALL]
    if not _MIN_LONG <= n <= _MAX_LONG:
        raise EncodeError(f"{n} does not fit an Avro long")
    z = ((n << 1) ^ (n >> 63)) & 0xFFFFFFFFFFFFFFFF
    if (1 << 49) <= z < (1 << 56):
        # microsecond timestamps (8 bytes): the low 14 bits from a table, the high part from a
        # one-entry cache, since consecutive timestamps share it for about 8 ms
        global _hi_key, _hi_bytes
        hi = z >> 14
        if hi != _hi_key:
            _hi_key, _hi_bytes = hi, _uvarint(hi)
        return _LOW14[z & 0x3FFF] + _hi_bytes
    return _uvarint(z)


_LOW14 = [bytes(((i & 0x7F) | 0x80, (i >> 7 & 0x7F) | 0x80)) for i in range(1 << 14)]
_hi_key, _hi_bytes = -1, b""


def int_bytes(n: int) -> bytes:
    if not _MIN_INT <= n <= _MAX_INT:
        raise EncodeError(f"{n} does not fit an Avro int")
    return long_bytes(n)


def floats_bytes(values) -> bytes:
    tobytes = getattr(values, "astype", None)
    if tobytes is not None:  # numpy array
        return values.astype("<f4", copy=False).tobytes()
    return struct.pack(f"<{len(values)}f", *values)


def doubles_bytes(values) -> bytes:
    if getattr(values, "astype", None) is not None:
        return values.astype("<f8", copy=False).tobytes()
    return struct.pack(f"<{len(values)}d", *values)


class _Gen:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.n = 0
        self.named: dict[str, dict] = {}

    def var(self) -> str:
        self.n += 1
        return f"_v{self.n}"

    def emit(self, ind: int, line: str) -> None:
        self.lines.append("    " * ind + line)

    def type(self, t, expr: str, ind: int, ns: str) -> None:
        if isinstance(t, str) and t not in _PRIMS:
            full = t if "." in t else f"{ns}.{t}" if ns else t
            t = self.named.get(full) or self.named[t]
        if isinstance(t, list):
            raise EncodeError("unions are not supported by the compiled encoder")
        if isinstance(t, str):
            self.prim(t, expr, ind)
            return
        kind = t["type"]
        if kind in _PRIMS:
            self.prim(kind, expr, ind)
        elif kind == "record":
            full = self.register(t, ns)
            rns = full.rpartition(".")[0]
            v = self.var()
            self.emit(ind, f"{v} = {expr}")
            for f in t["fields"]:
                if "default" in f:
                    d = f["default"]
                    dflt = "()" if d == [] else repr(d)
                    fexpr = f"{v}.get({f['name']!r}, {dflt})"
                else:
                    fexpr = f"{v}[{f['name']!r}]"
                self.type(f["type"], fexpr, ind, rns)
        elif kind == "fixed":
            self.register(t, ns)
            v = self.var()
            self.emit(ind, f"{v} = {expr}")
            self.emit(ind, f"if len({v}) != {t['size']}: raise EncodeError('fixed {t['name']} needs {t['size']} bytes, got %d' % len({v}))")
            self.emit(ind, f"a({v})")
        elif kind == "array":
            items = t["items"]
            v = self.var()
            self.emit(ind, f"{v} = {expr}")
            self.emit(ind, f"if len({v}):")
            self.emit(ind + 1, f"a(L(len({v})))")
            if items in ("float", "double"):
                self.emit(ind + 1, f"a({'FS' if items == 'float' else 'DS'}({v}))")
            else:
                it = self.var()
                self.emit(ind + 1, f"for {it} in {v}:")
                self.type(items, it, ind + 2, ns)
            self.emit(ind, "a(b'\\x00')")
        else:
            raise EncodeError(f"type {kind!r} is not supported by the compiled encoder")

    def register(self, t: dict, ns: str) -> str:
        name = t["name"]
        full = name if "." in name else f"{t.get('namespace', ns)}.{name}" if t.get("namespace", ns) else name
        self.named[full] = t
        self.named.setdefault(name, t)
        return full

    def prim(self, t: str, expr: str, ind: int) -> None:
        if t == "long":
            self.emit(ind, f"a(L({expr}))")
        elif t == "int":
            self.emit(ind, f"a(I({expr}))")
        elif t == "string":
            v = self.var()
            self.emit(ind, f"{v} = {expr}.encode()")
            self.emit(ind, f"a(L(len({v}))); a({v})")
        elif t == "bytes":
            v = self.var()
            self.emit(ind, f"{v} = {expr}")
            self.emit(ind, f"a(L(len({v}))); a({v})")
        elif t == "boolean":
            self.emit(ind, f"a(b'\\x01' if {expr} else b'\\x00')")
        elif t == "float":
            self.emit(ind, f"a(F({expr}))")
        elif t == "double":
            self.emit(ind, f"a(D({expr}))")
        elif t == "null":
            pass
        else:
            raise EncodeError(f"primitive {t!r} not supported")


_PRIMS = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


def compile_encoder(schema: dict, prefix: bytes = b"", predefine=()) -> Callable[[dict], bytes]:
    """A function record -> ``prefix`` + Avro binary body of ``schema``.

    ``predefine``: named types (dicts) that ``schema`` refers to by name but does not define.
    """
    g = _Gen()
    for t in predefine:
        g.register(t, schema.get("namespace", ""))
    g.emit(1, f"parts = [{prefix!r}]")
    g.emit(1, "a = parts.append")
    g.emit(1, "try:")
    g.type(schema, "r", 2, schema.get("namespace", ""))
    g.emit(1, "except (KeyError, TypeError, AttributeError, struct.error, OverflowError) as exc:")
    g.emit(2, f"raise EncodeError('record does not fit schema {schema.get('name')}: %r' % (exc,)) from None")
    g.emit(1, "return b''.join(parts)")
    src = "def encode(r):\n" + "\n".join(g.lines) + "\n"
    env = {"L": long_bytes, "I": int_bytes, "F": _FLOAT, "D": _DOUBLE, "FS": floats_bytes, "DS": doubles_bytes,
           "EncodeError": EncodeError, "struct": struct}
    exec(compile(src, f"<avro encoder {schema.get('name')}>", "exec"), env)
    fn = env["encode"]
    fn.source = src
    return fn
