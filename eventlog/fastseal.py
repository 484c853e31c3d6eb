"""The chain writer's sealer in C: header, payload and SHA-256 of an event in one call.

``eventlog/_seal.c`` (compiled on first use into the user's cache, like the verifier's fast path)
seals an event about 3x faster than the Python closure of ``ChainWriter.sealer``, which defines the
bytes and stays the reference: the C sealer hands every call it does not take on its fast path (an
unusual value type, a missing field, a number out of range: see the C file) to that closure,
unchanged, so the bytes and the errors are the reference ones by construction. Tests check that
both give the same events over every schema.

``Head`` is the mutable head (seq, hash) a writer shares with its sealers: the C type when the
module is built, else ``PyHead``. ``MARLGRC_NO_NATIVE=1`` turns the C sealer off.
"""
from __future__ import annotations

from pathlib import Path

from .native import load_hashing_extension

SOURCE = Path(__file__).with_name("_seal.c")


class PyHead:
    """A chain's head (seq, hash), shared by its writer and sealers (pure-Python twin of ``_seal.Head``)."""

    __slots__ = ("seq", "hash")

    def __init__(self, seq: int = -1, hash: bytes = bytes(32)):  # noqa: A002 - the field's name
        self.seq, self.hash = seq, hash


def ndarray_probes() -> list:
    """Arrays of every kind the sealer must tell apart: the C module reads a 1-D float array's fields
    directly only if it reads each of these as the buffer protocol does."""
    import numpy as np  # noqa: PLC0415 - float32/float64 arrays are copied as they are (a locked dependency)

    base = np.arange(12, dtype=np.float64)
    probes = [base, base.astype(np.float32), base[::2], base.astype(np.float32)[::3], base.reshape(3, 4),
              base.astype(np.float32).reshape(2, 6), base.astype(">f4"), base.astype(">f8"), base.astype(np.int32),
              base.astype(np.int64), base.astype(np.float16), base.astype(np.complex64), np.zeros(0, np.float32),
              np.float32(1.0) * np.ones(1, np.float32), base.astype(np.float32)[5:], np.array(1.5, np.float32),
              np.zeros((0, 3), np.float32), base.astype(np.longdouble), base.astype(np.float32)[::-1]]
    return probes


ARRAYS_DIRECT = False  # whether the C sealer reads float arrays' fields directly (else: the buffer protocol)


def _configure(mod) -> None:
    import numpy  # noqa: PLC0415

    global ARRAYS_DIRECT
    ARRAYS_DIRECT = mod.set_ndarray(numpy.ndarray, ndarray_probes())


_native = load_hashing_extension(SOURCE, "_seal", purpose="the chain writer's C sealer", configure=_configure)
NATIVE = _native is not None
Head = _native.Head if NATIVE else PyHead
Sealer = _native.Sealer if NATIVE else None
