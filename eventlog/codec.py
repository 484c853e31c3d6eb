"""Avro single-object encoding: ``C3 01`` + CRC-64-AVRO fingerprint (8 bytes, little-endian) + body.

Decoding resolves the writer schema by fingerprint and reads it with the current reader schema of
the same name, so events written under an older schema are read by the newer one.
"""
from __future__ import annotations

import io
import re
import struct
from dataclasses import dataclass
from functools import lru_cache

import fastavro
from fastavro.schema import fingerprint as _fastavro_fingerprint
from fastavro.schema import to_parsing_canonical_form

import schemas as schema_files

MAGIC = b"\xc3\x01"
PREFIX_LEN = 10  # magic + fingerprint
HASH_LEN = 32
ZERO_HASH = bytes(HASH_LEN)

# The governance header every event schema opens with, in this order (docs/HASHING.md).
HEADER_FIELDS = (
    "prev_event_hash", "seq", "chain_id", "event_id", "event_type", "run_id", "produced_at", "producer_id",
    "data_classification", "retention_expiry", "feature_schema_version", "policy_version", "rule_version",
    "source_event_hashes",
)

def fingerprint(schema: dict) -> bytes:
    """8-byte little-endian CRC-64-AVRO (the Avro specification's Rabin fingerprint) of the schema's
    Parsing Canonical Form, as fastavro computes it (its hex string lists the bytes in that order)."""
    canonical = to_parsing_canonical_form(fastavro.parse_schema(schema, _write_hint=False))
    return bytes.fromhex(_fastavro_fingerprint(canonical, "CRC-64-AVRO"))


class EncodeError(ValueError):
    """A record that does not fit its schema."""


class DecodeError(ValueError):
    """A value that is not a decodable marlgrc event. ``kind`` is one of
    not_single_object, unknown_fingerprint, truncated, malformed."""

    def __init__(self, kind: str, reason: str):
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True)
class _Writer:
    name: str
    version: str
    parsed: object


class Codec:
    """Encodes and decodes marlgrc events by schema name (file stem, e.g. ``joint_action``)."""

    def __init__(self, current: dict[str, dict], history: dict[str, dict] | None = None):
        for name, s in current.items():
            check_contract(name, s)
        self._parsed: dict[str, dict] = {}
        self._payloads: dict[str, dict] = {}
        for name, s in current.items():
            named: dict = {}  # the payload's references (marlgrc.Sha256, ...) resolve to the full schema's types
            self._parsed[name] = fastavro.parse_schema(s, named)
            self._payloads[name] = fastavro.parse_schema(_payload_schema(s), named)
        self._fingerprints = {name: fingerprint(s) for name, s in current.items()}
        self._writers: dict[bytes, _Writer] = {}
        for stem, s in (history or {}).items():
            name, _, version = stem.partition(".")
            self._writers[fingerprint(s)] = _Writer(name, version, fastavro.parse_schema(s))
        for name, fp in self._fingerprints.items():
            self._writers[fp] = _Writer(name, "current", self._parsed[name])

    @property
    def names(self) -> list[str]:
        return sorted(self._parsed)

    def fingerprint(self, name: str) -> bytes:
        return self._fingerprints[name]

    def schema_for(self, value: bytes) -> str:
        """Name of the schema that wrote ``value`` (no body decoding)."""
        return self._writer(value).name

    def encode(self, name: str, record: dict) -> bytes:
        """``C3 01`` + fingerprint + the Avro binary body of ``record`` under the current schema ``name``."""
        try:
            parsed = self._parsed[name]
        except KeyError:
            raise KeyError(f"unknown schema {name!r}; known: {self.names}") from None
        return _write(MAGIC + self._fingerprints[name], parsed, record, name)

    def prefix(self, name: str) -> bytes:
        """``C3 01`` + fingerprint of the current schema ``name``."""
        return MAGIC + self._fingerprints[name]

    def payload_encoder(self, name: str):
        """``encode(payload) -> bytes``: the Avro binary of the fields between the header and
        ``event_hash`` of schema ``name`` (the chain writer writes the header itself)."""
        parsed = self._payloads[name]
        return lambda payload: _write(b"", parsed, payload, name)

    def encode_payload(self, name: str, payload: dict) -> bytes:
        """Avro binary of the fields between the header and ``event_hash``."""
        return _write(b"", self._payloads[name], payload, name)

    def decode(self, value: bytes) -> tuple[str, dict]:
        """(schema name, record) read with the current schema of that name."""
        writer = self._writer(value)
        buf = io.BytesIO(value)
        buf.seek(PREFIX_LEN)
        reader = self._parsed[writer.name]
        try:
            record = fastavro.schemaless_reader(buf, writer.parsed, reader if writer.parsed is not reader else None)
        except (EOFError, StopIteration, IndexError, struct.error) as exc:
            raise DecodeError("truncated", f"{writer.name} body ends early ({len(value)} bytes): {_said(exc)}") from None
        except Exception as exc:  # fastavro raises assorted errors on garbage
            raise DecodeError("malformed", f"{writer.name} body does not decode: {_said(exc)}") from None
        if buf.tell() != len(value):
            raise DecodeError("malformed", f"{writer.name}: {len(value) - buf.tell()} trailing bytes after the record")
        return writer.name, record

    def _writer(self, value: bytes) -> _Writer:
        if len(value) < PREFIX_LEN or value[:2] != MAGIC:
            raise DecodeError("not_single_object", "value does not start with the Avro single-object marker C3 01")
        fp = bytes(value[2:PREFIX_LEN])
        writer = self._writers.get(fp)
        if writer is None:
            raise DecodeError("unknown_fingerprint", f"no known schema has fingerprint {fp.hex()}")
        return writer


def _write(prefix: bytes, parsed: dict, record: dict, name: str) -> bytes:
    """``prefix`` + fastavro's Avro binary of ``record`` (arrays as one block, fields in schema order)."""
    buf = io.BytesIO(prefix)
    buf.seek(len(prefix))
    try:
        fastavro.schemaless_writer(buf, parsed, record)
    except (KeyError, TypeError, AttributeError, ValueError, struct.error, OverflowError) as exc:
        raise EncodeError(f"record does not fit schema {name}: {_said(exc)}") from None
    return buf.getvalue()


def _said(exc: BaseException) -> str:
    """An exception's repr without object addresses, so the same bad input gives the same text
    (it is stored in ledger findings and dead letters)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(exc))


def check_contract(name: str, schema: dict) -> None:
    """Refuse a schema that breaks the hash contract."""
    fields = schema.get("fields", [])
    got = tuple(f["name"] for f in fields[:len(HEADER_FIELDS)])
    if got != HEADER_FIELDS:
        raise ValueError(f"schema {name} must open with the header fields {HEADER_FIELDS}, has {got}")
    for f in (fields[0], fields[-1]):
        t = f["type"]
        size = t.get("size") if isinstance(t, dict) else 32 if t == "marlgrc.Sha256" else None
        if size != 32:
            raise ValueError(f"schema {name}: field {f['name']} must be fixed(32)")
    if fields[-1]["name"] != "event_hash":
        raise ValueError(f"schema {name} must end with event_hash")


def _payload_schema(schema: dict) -> dict:
    """The schema's payload fields as a record of their own; named types keep their definitions."""
    fields = schema["fields"][len(HEADER_FIELDS):-1]
    return {"type": "record", "name": schema["name"] + "Payload", "namespace": schema.get("namespace", ""),
            "fields": fields}


@lru_cache(maxsize=1)
def default_codec() -> Codec:
    """The codec over the schemas shipped in ``schemas/`` (current and history)."""
    return Codec(schema_files.current(), schema_files.history())
