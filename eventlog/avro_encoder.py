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
# varint pieces: _LOW14[x] is the two continued bytes of the low 14 bits x, _UV14[x] the whole varint of
# x < 2**14; a varint of z is _LOW14[z & 0x3FFF] + (varint of z >> 14) whenever z >> 14 > 0
_LOW14 = [bytes(((i & 0x7F) | 0x80, (i >> 7 & 0x7F) | 0x80)) for i in range(1 << 14)]
_UV14 = [_uvarint(i) for i in range(1 << 14)]
# high parts (z >> 14) of 8-byte varints (microsecond timestamps: produced_at and retention_expiry of
# every event); each stays the same for about 8 ms, so a few entries serve every timestamp in flight
_HI: dict[int, bytes] = {}
_HI_MAX = 64


def ts_high(hi: int) -> bytes:
    """Varint of ``hi`` (the high part of a timestamp varint), cached."""
    b = _HI.get(hi)
    if b is None:
        if len(_HI) >= _HI_MAX:
            _HI.clear()
        b = _HI[hi] = _uvarint(hi)
    return b


def long_bytes(n: int) -> bytes:
    """Zigzag varint of a long."""
    if -_SMALL <= n < _SMALL:
        return _SMALL_LONGS[n + _SMALL]
    if not _MIN_LONG <= n <= _MAX_LONG:
        raise EncodeError(f"{n} does not fit an Avro long")
    z = ((n << 1) ^ (n >> 63)) & 0xFFFFFFFFFFFFFFFF
    if z < (1 << 28):  # 3-4 bytes (seq >= 8192, step counters, ...)
        return _LOW14[z & 0x3FFF] + _UV14[z >> 14]
    if (1 << 49) <= z < (1 << 56):  # 8 bytes: microsecond timestamps
        hi = z >> 14
        b = _HI.get(hi)
        if b is None:
            b = ts_high(hi)
        return _LOW14[z & 0x3FFF] + b
    if z < (1 << 42):
        return _LOW14[z & 0x3FFF] + _LOW14[(z >> 14) & 0x3FFF] + _UV14[z >> 28]
    return _uvarint(z)


def int_bytes(n: int) -> bytes:
    if not _MIN_INT <= n <= _MAX_INT:
        raise EncodeError(f"{n} does not fit an Avro int")
    return long_bytes(n)


_FLOATS: dict[int, Callable[..., bytes]] = {}
_DOUBLES: dict[int, Callable[..., bytes]] = {}


def _packer(cache: dict[int, Callable[..., bytes]], code: str, n: int) -> Callable[..., bytes]:
    if len(cache) >= 256:
        cache.clear()
    pack = cache[n] = struct.Struct(f"<{n}{code}").pack
    return pack


_NDARRAY = _F4 = _F8 = None  # numpy's ndarray and its '<f4' / '<f8' dtypes, once an array has been seen


def _numpy_types() -> None:
    global _NDARRAY, _F4, _F8
    import numpy

    _NDARRAY, _F4, _F8 = numpy.ndarray, numpy.dtype("<f4"), numpy.dtype("<f8")


def floats_bytes(values) -> bytes:
    if getattr(values, "astype", None) is not None:  # numpy array
        if _NDARRAY is None:
            _numpy_types()
        if type(values) is _NDARRAY and values.dtype is _F4:
            return values.tobytes()  # C order, as astype(copy=False).tobytes() gives it
        return values.astype("<f4", copy=False).tobytes()
    n = len(values)
    return (_FLOATS.get(n) or _packer(_FLOATS, "f", n))(*values)


def doubles_bytes(values) -> bytes:
    if getattr(values, "astype", None) is not None:
        if _NDARRAY is None:
            _numpy_types()
        if type(values) is _NDARRAY and values.dtype is _F8:
            return values.tobytes()
        return values.astype("<f8", copy=False).tobytes()
    n = len(values)
    return (_DOUBLES.get(n) or _packer(_DOUBLES, "d", n))(*values)


class _Gen:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.n = 0
        self.named: dict[str, dict] = {}
        self.structs: dict[str, str] = {}  # struct format -> name of its pack function in the encoder

    def var(self) -> str:
        self.n += 1
        return f"_v{self.n}"

    def emit(self, ind: int, line: str) -> None:
        self.lines.append("    " * ind + line)

    def resolve(self, t, ns: str):
        """``t`` with a named type's reference replaced by its definition; unions refused."""
        if isinstance(t, str) and t not in _PRIMS:
            full = t if "." in t else f"{ns}.{t}" if ns else t
            t = self.named.get(full) or self.named[t]
        if isinstance(t, list):
            raise EncodeError("unions are not supported by the compiled encoder")
        return t

    def type(self, t, expr: str, ind: int, ns: str) -> None:
        t = self.resolve(t, ns)
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
            run: list[tuple[str, str]] = []  # consecutive float/double fields: one struct pack
            for f in t["fields"]:
                if "default" in f:
                    d = f["default"]
                    dflt = "()" if d == [] else repr(d)
                    fexpr = f"{v}.get({f['name']!r}, {dflt})"
                else:
                    fexpr = f"{v}[{f['name']!r}]"
                ft = f["type"]["type"] if isinstance(f["type"], dict) and f["type"].get("type") in ("float", "double") \
                    else f["type"]
                if ft in ("float", "double"):
                    run.append((ft, fexpr))
                    continue
                self.flush_floats(run, ind)
                self.type(f["type"], fexpr, ind, rns)
            self.flush_floats(run, ind)
        elif kind == "fixed":
            self.register(t, ns)
            v = self.var()
            self.emit(ind, f"{v} = {expr}")
            self.emit(ind, f"if len({v}) != {t['size']}: raise EncodeError('fixed {t['name']} needs {t['size']} bytes, got %d' % len({v}))")
            self.emit(ind, f"p.append({v})")
        elif kind == "array":
            items = t["items"]
            v = self.var()
            n = self.var()
            self.emit(ind, f"{v} = {expr}")
            self.emit(ind, f"{n} = len({v})")
            self.emit(ind, f"if {n}:")
            self.emit(ind + 1, self.count(n))
            if items in ("float", "double"):
                self.emit(ind + 1, f"p.append({'FS' if items == 'float' else 'DS'}({v}))")
            else:
                it = self.var()
                self.emit(ind + 1, f"for {it} in {v}:")
                self.type(items, it, ind + 2, ns)
            self.emit(ind, "p.append(b'\\x00')")
        else:
            raise EncodeError(f"type {kind!r} is not supported by the compiled encoder")

    def count(self, n: str) -> str:
        """Append the varint of a length or count ``n`` (>= 0)."""
        return f"p.append(S[{n} + {_SMALL}] if {n} < {_SMALL} else L({n}))"

    def flush_floats(self, run: list[tuple[str, str]], ind: int) -> None:
        if len(run) == 1:
            self.prim(run[0][0], run[0][1], ind)
        elif run:
            fmt = "<" + "".join("f" if k == "float" else "d" for k, _ in run)
            name = self.structs.setdefault(fmt, f"_P{len(self.structs)}")
            self.emit(ind, f"p.append({name}({', '.join(e for _, e in run)}))")
        run.clear()

    def register(self, t: dict, ns: str) -> str:
        name = t["name"]
        full = name if "." in name else f"{t.get('namespace', ns)}.{name}" if t.get("namespace", ns) else name
        self.named[full] = t
        self.named.setdefault(name, t)
        return full

    def prim(self, t: str, expr: str, ind: int) -> None:
        if t in ("long", "int"):  # small values from the table, inline; the rest through L / I
            v = self.var()
            self.emit(ind, f"{v} = {expr}")
            rest = "L" if t == "long" else "I"
            self.emit(ind, f"p.append(S[{v} + {_SMALL}] if {-_SMALL} <= {v} < {_SMALL} else {rest}({v}))")
        elif t == "string":
            v = self.var()
            n = self.var()
            self.emit(ind, f"{v} = {expr}.encode()")
            self.emit(ind, f"{n} = len({v})")
            self.emit(ind, f"{self.count(n)}; p.append({v})")
        elif t == "bytes":
            v = self.var()
            n = self.var()
            self.emit(ind, f"{v} = {expr}")
            self.emit(ind, f"{n} = len({v})")
            self.emit(ind, f"{self.count(n)}; p.append({v})")
        elif t == "boolean":
            self.emit(ind, f"p.append(b'\\x01' if {expr} else b'\\x00')")
        elif t == "float":
            self.emit(ind, f"p.append(F({expr}))")
        elif t == "double":
            self.emit(ind, f"p.append(D({expr}))")
        elif t == "null":
            pass
        else:
            raise EncodeError(f"primitive {t!r} not supported")


_PRIMS = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


def compile_encoder(schema: dict, prefix: bytes = b"", predefine=()) -> Callable[[dict], bytes]:
    """A function record -> ``prefix`` + Avro binary body of ``schema``.

    ``predefine``: named types (dicts) that ``schema`` refers to by name but does not define. The
    function's ``into(record, parts)`` attribute appends the body's pieces to the list ``parts``
    instead (no prefix): for callers that join the body with bytes of their own.
    """
    g = _Gen()
    for t in predefine:
        g.register(t, schema.get("namespace", ""))
    g.type(schema, "r", 2, schema.get("namespace", ""))
    body = "\n".join(g.lines)
    fail = ("    except (KeyError, TypeError, AttributeError, struct.error, OverflowError) as exc:\n"
            f"        raise EncodeError('record does not fit schema {schema.get('name')}: %r' % (exc,)) from None\n")
    src = f"def encode(r):\n    p = [{prefix!r}]\n    try:\n{body}\n{fail}    return b''.join(p)\n"
    src_into = f"def encode_into(r, p):\n    try:\n{body}\n{fail}"
    env = {"L": long_bytes, "I": int_bytes, "S": _SMALL_LONGS, "F": _FLOAT, "D": _DOUBLE, "FS": floats_bytes,
           "DS": doubles_bytes, "EncodeError": EncodeError, "struct": struct}
    env.update({name: struct.Struct(fmt).pack for fmt, name in g.structs.items()})
    exec(compile(src, f"<avro encoder {schema.get('name')}>", "exec"), env)
    exec(compile(src_into, f"<avro encoder {schema.get('name')} (into)>", "exec"), env)
    fn = env["encode"]
    fn.source = src
    fn.into = env["encode_into"]
    return fn


# Opcodes of a payload program: the compiled form of a schema that eventlog/_seal.c walks (a tree of
# tuples ``(op, ...)``: FIXED carries its size, ARRAY its items' node, RECORD a tuple of fields
# ``(name, node)`` or ``(name, node, default)``; arrays of float or double are FLOAT_ARRAY and
# DOUBLE_ARRAY). The same traversal as the Python encoder's ``_Gen.type``, with the same defaults.
(OP_NULL, OP_BOOL, OP_INT, OP_LONG, OP_FLOAT, OP_DOUBLE, OP_BYTES, OP_STRING, OP_FIXED, OP_ARRAY, OP_FLOAT_ARRAY,
 OP_DOUBLE_ARRAY, OP_RECORD) = range(13)
_PRIM_OPS = {"null": (OP_NULL,), "boolean": (OP_BOOL,), "int": (OP_INT,), "long": (OP_LONG,), "float": (OP_FLOAT,),
             "double": (OP_DOUBLE,), "bytes": (OP_BYTES,), "string": (OP_STRING,)}


def compile_program(schema: dict, predefine=()) -> tuple:
    """The payload program of ``schema`` (see the opcodes above); ``predefine`` as in ``compile_encoder``."""
    g = _Gen()
    for t in predefine:
        g.register(t, schema.get("namespace", ""))

    def node(t, ns: str) -> tuple:
        t = g.resolve(t, ns)
        if isinstance(t, str):
            return _PRIM_OPS[t]
        kind = t["type"]
        if kind in _PRIMS:
            return _PRIM_OPS[kind]
        if kind == "record":
            full = g.register(t, ns)
            rns = full.rpartition(".")[0]
            fields = []
            for f in t["fields"]:
                sub = node(f["type"], rns)
                if "default" in f:
                    fields.append((f["name"], sub, () if f["default"] == [] else f["default"]))
                else:
                    fields.append((f["name"], sub))
            return (OP_RECORD, tuple(fields))
        if kind == "fixed":
            g.register(t, ns)
            return (OP_FIXED, int(t["size"]))
        if kind == "array":
            items = t["items"]
            if items == "float":
                return (OP_FLOAT_ARRAY,)
            if items == "double":
                return (OP_DOUBLE_ARRAY,)
            return (OP_ARRAY, node(items, ns))
        raise EncodeError(f"type {kind!r} is not supported by the compiled encoder")

    return node(schema, schema.get("namespace", ""))
