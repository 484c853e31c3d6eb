"""The chain writer: one writer per (topic, chain_id), seq from 0, each event linked to the last."""
from __future__ import annotations

import time
import uuid
from hashlib import sha256
from typing import Callable, Iterable, NamedTuple, Sequence

import schemas as schema_files

from .codec import ZERO_HASH, Codec, default_codec

CLASSIFICATIONS = ("public", "internal", "confidential", "restricted")
# days an event of each classification is kept (topic retention.ms and each event's retention_expiry)
RETENTION_DAYS = {"public": 3650, "internal": 365, "confidential": 180, "restricted": 30}
MICROS_PER_DAY = 86_400_000_000


def now_micros() -> int:
    return time.time_ns() // 1000


_MIN_LONG, _MAX_LONG = -(1 << 63), (1 << 63) - 1
# varint pieces: UVARINT14[z] is the varint of z < 2**14; LOW14[z & 0x3FFF] the two (continued) bytes
# of z's low 14 bits, so the varint of z >= 2**14 is LOW14[z & 0x3FFF] + (the varint of z >> 14)
UVARINT14 = [bytes([z]) if z < 0x80 else bytes([(z & 0x7F) | 0x80, z >> 7]) for z in range(1 << 14)]
LOW14 = [bytes([(z & 0x7F) | 0x80, ((z >> 7) & 0x7F) | 0x80]) for z in range(1 << 14)]


def long_bytes(n: int) -> bytes:
    """Avro's encoding of a long: zigzag, then a little-endian base-128 varint (built from 14-bit
    pieces: header longs are seqs, counts and microsecond timestamps, up to 8 bytes)."""
    if not _MIN_LONG <= n <= _MAX_LONG:
        raise ValueError(f"{n} does not fit an Avro long")
    z = (n << 1) ^ (n >> 63)  # zigzag; >= 0 for every long
    if z < 16384:
        return UVARINT14[z]
    if z < 1 << 28:
        return LOW14[z & 0x3FFF] + UVARINT14[z >> 14]
    if z < 1 << 42:
        return LOW14[z & 0x3FFF] + LOW14[(z >> 14) & 0x3FFF] + UVARINT14[z >> 28]
    if z < 1 << 56:
        return LOW14[z & 0x3FFF] + LOW14[(z >> 14) & 0x3FFF] + LOW14[(z >> 28) & 0x3FFF] + UVARINT14[z >> 42]
    return LOW14[z & 0x3FFF] + LOW14[(z >> 14) & 0x3FFF] + LOW14[(z >> 28) & 0x3FFF] + LOW14[(z >> 42) & 0x3FFF] \
        + (bytes([z >> 56]) if z < 1 << 63 else bytes([((z >> 56) & 0x7F) | 0x80, z >> 63]))


def _string(s: str) -> bytes:
    b = s.encode()
    return long_bytes(len(b)) + b


class Head:
    """A chain's head (seq, hash), shared by a writer and its sealers."""

    __slots__ = ("seq", "hash")

    def __init__(self, seq: int = -1, hash: bytes = ZERO_HASH):  # noqa: A002 - the field's name
        self.seq, self.hash = seq, hash


class ChainHead(NamedTuple):
    """The last event written to a chain; ``seq == -1`` for an empty chain."""

    seq: int = -1
    event_hash: bytes = ZERO_HASH


GENESIS = ChainHead()


class Event(NamedTuple):
    """One sealed event: its exact bytes and where it belongs."""

    topic: str
    chain_id: str
    seq: int
    event_hash: bytes
    value: bytes
    event_type: str


def event_id_prefix() -> str:
    """Random UUIDv8 prefix of one writer instance; the last 48 bits of each event id are its seq."""
    u = uuid.uuid4().hex
    return f"{u[:8]}-{u[8:12]}-8{u[13:16]}-{'89ab'[int(u[16], 16) & 3]}{u[17:20]}-"


_ONLY_32 = {32}
_SEQ_MAX = (1 << 48) - 1  # the event id's last 12 hex digits are the seq
_SEALERS_MAX = 256


class ChainWriter:
    """Appends events to one chain. Not thread-safe: one writer per chain (docs/ARCHITECTURE.md, "The hash contract").

    ``topic`` is the logical topic name (``marl.joint.action``); a deployment prefix is applied by
    the Kafka layer, so hashes never depend on it. The header is encoded here directly, in the
    schema's field order (the codec checks every schema opens with exactly these fields: a few
    varints and strings, most of them constant for a sealer); the payload goes through fastavro.

    ``sealer(event_type, ...)`` gives a function that seals the chain's next event of one type with
    fixed header strings: the precomputed form of ``append`` for hot loops (same bytes).
    """

    __slots__ = ("topic", "chain_id", "run_id", "producer_id", "data_classification", "feature_schema_version",
                 "codec", "clock", "id_prefix", "_head", "_chain", "_event_id_prefix", "_tail_const",
                 "_types", "_classes", "_sealers")

    def __init__(self, topic: str, chain_id: str, run_id: str, producer_id: str,
                 data_classification: str = "internal", feature_schema_version: str = "1",
                 head: ChainHead = GENESIS, codec: Codec | None = None, clock: Callable[[], int] = now_micros,
                 id_prefix: str | None = None):
        if data_classification not in CLASSIFICATIONS:
            raise ValueError(f"data_classification {data_classification!r} is not one of {CLASSIFICATIONS}")
        self.topic = topic
        self.chain_id = chain_id
        self.run_id = run_id
        self.producer_id = producer_id
        self.data_classification = data_classification
        self.feature_schema_version = feature_schema_version
        self.codec = codec if codec is not None else default_codec()
        self.clock = clock
        self.id_prefix = id_prefix if id_prefix is not None else event_id_prefix()
        self._head = Head(*head)
        self._chain = _string(chain_id)
        self._event_id_prefix = b"\x48" + self.id_prefix.encode()  # event_id: 36 chars, length 36 -> 0x48
        self._tail_const = _string(feature_schema_version)
        self._types: dict[str, tuple[str, bytes, bytes]] = {}
        self._classes = {c: (_string(producer_id) + _string(c), RETENTION_DAYS[c] * MICROS_PER_DAY)
                         for c in CLASSIFICATIONS}
        self._sealers: dict[tuple, Callable[..., Event]] = {}

    @property
    def head(self) -> ChainHead:
        """The last event written (``seq == -1``: none yet)."""
        h = self._head
        return ChainHead(h.seq, h.hash)

    @head.setter
    def head(self, head: ChainHead) -> None:
        self._head.seq, self._head.hash = head

    @property
    def next_seq(self) -> int:
        """The seq the next event will get."""
        return self._head.seq + 1

    def __repr__(self) -> str:
        return (f"ChainWriter(topic={self.topic!r}, chain_id={self.chain_id!r}, run_id={self.run_id!r}, "
                f"producer_id={self.producer_id!r}, data_classification={self.data_classification!r}, "
                f"head={self.head!r})")

    def _type(self, event_type: str) -> tuple[str, bytes, bytes]:
        t = self._types.get(event_type)
        if t is None:
            name = schema_files.schema_name(event_type)
            if schema_files.topic_of(event_type) != self.topic:
                raise ValueError(f"{event_type} belongs on {schema_files.topic_of(event_type)}, not {self.topic}")
            t = self._types[event_type] = (name, self.codec.prefix(name),
                                           _string(event_type) + _string(self.run_id))
        return t

    def sealer(self, event_type: str, *, policy_version: str = "", rule_version: str = "",
               data_classification: str | None = None) -> Callable[..., Event]:
        """``seal(payload, source_event_hashes=(), produced_at=None)``: the chain's next event of
        ``event_type`` with these header strings; the same bytes as ``append`` with the same
        arguments, with the header's constant parts encoded once. Sealers of one writer share its head.

        ``source_event_hashes``: a list or tuple of 32-byte digests. ``produced_at`` (microseconds):
        a reading of this writer's ``clock`` taken when the event's data was captured, for callers
        that seal a few events later in one go; None reads the clock now."""
        name, prefix, type_run = self._type(event_type)
        try:
            producer_class, retention = self._classes[data_classification or self.data_classification]
        except KeyError:
            raise ValueError(f"data_classification {data_classification!r} is not one of {CLASSIFICATIONS}") from None
        encode_payload = self.codec.payload_encoder(name)
        chain_and_id = self._chain + self._event_id_prefix
        tail = (self._tail_const + (_string(policy_version) if policy_version else b"\x00")
                + (_string(rule_version) if rule_version else b"\x00"))
        clock = self.clock
        topic, chain_id = self.topic, self.chain_id
        join, digest_of, new_tuple = b"".join, sha256, tuple.__new__
        head = self._head

        def seal(payload: dict, source_event_hashes: Sequence[bytes] = (), produced_at: int | None = None) -> Event:
            seq = head.seq + 1
            if seq > _SEQ_MAX:
                raise ValueError(f"chain {chain_id} is full: an event id holds 48 bits of seq and {seq} does not fit; "
                                 f"continue on a new chain id")
            t = produced_at if produced_at is not None else clock()
            parts = [prefix, head.hash, long_bytes(seq),
                     chain_and_id, b"%012x" % seq, type_run, long_bytes(t), producer_class,
                     long_bytes(t + retention), tail]
            if source_event_hashes:
                n = len(source_event_hashes)
                if {*map(len, source_event_hashes)} != _ONLY_32:
                    raise ValueError("source_event_hashes must be 32-byte SHA-256 digests")
                parts.append(long_bytes(n))
                parts += source_event_hashes
            parts.append(b"\x00")
            parts.append(encode_payload(payload))
            body = join(parts)
            event_hash = digest_of(body).digest()
            head.seq, head.hash = seq, event_hash
            return new_tuple(Event, (topic, chain_id, seq, event_hash, body + event_hash, event_type))

        return seal

    def append(self, event_type: str, payload: dict, *, policy_version: str = "", rule_version: str = "",
               source_event_hashes: Iterable[bytes] = (), data_classification: str | None = None) -> Event:
        """Encode ``payload`` (the schema's fields after the header) as the chain's next event."""
        key = (event_type, policy_version, rule_version, data_classification)
        seal = self._sealers.get(key)
        if seal is None:
            seal = self.sealer(event_type, policy_version=policy_version, rule_version=rule_version,
                               data_classification=data_classification)
            if len(self._sealers) >= _SEALERS_MAX:
                self._sealers.clear()
            self._sealers[key] = seal
        if source_event_hashes and not isinstance(source_event_hashes, (list, tuple)):
            source_event_hashes = list(source_event_hashes)
        return seal(payload, source_event_hashes)
