"""EventLog: the chain writers of one process, where they send, and their signed checkpoints."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import schemas as schema_files

from .chain import GENESIS, ChainHead, ChainWriter, Event, event_id_prefix, now_micros
from .checkpoint import Signer, checkpoint_payload, statement_for
from .codec import Codec, default_codec
from .topics import TOPIC_CLASSIFICATION

CHECKPOINT_TOPIC = "marl.audit.checkpoints"


class Sink(Protocol):
    """Where sealed events go: Kafka (``eventlog.kafka.EventProducer``) or memory."""

    def send(self, topic: str, key: str, value: bytes) -> None: ...


@dataclass
class MemorySink:
    """Keeps (topic, key, value) in order; for tests, vectors and offline bundles."""

    sent: list[tuple[str, str, bytes]] = field(default_factory=list)

    def send(self, topic: str, key: str, value: bytes) -> None:
        self.sent.append((topic, key, value))


@dataclass
class _Pending:
    first_seq: int
    prev_head_hash: bytes
    hashes: list[bytes]


class EventLog:
    """All chains one process writes for one run, with periodic signed checkpoints.

    Every ``checkpoint_every`` events of a chain, and for every chain on ``checkpoint()`` /
    ``close()``, a checkpoint event naming that chain's new range goes to
    ``marl.audit.checkpoints`` on the chain ``{run_id}:checkpoints:{producer_id}``.
    """

    def __init__(self, sink: Sink, *, run_id: str, producer_id: str, signer: Signer | None = None,
                 checkpoint_every: int = 10_000, codec: Codec | None = None,
                 clock: Callable[[], int] = now_micros, id_prefixes: Callable[[], str] = event_id_prefix):
        self.sink = sink
        self.run_id = run_id
        self.producer_id = producer_id
        self.signer = signer
        self.checkpoint_every = checkpoint_every
        self.codec = codec or default_codec()
        self._clock = clock
        self._id_prefixes = id_prefixes  # deterministic ones only for test vectors
        self._writers: dict[tuple[str, str], ChainWriter] = {}
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._checkpoint_chain = f"{run_id}:checkpoints:{producer_id}"

    def writer(self, topic: str, chain_id: str, *, head: ChainHead = GENESIS,
               data_classification: str | None = None) -> ChainWriter:
        key = (topic, chain_id)
        w = self._writers.get(key)
        if w is None:
            w = ChainWriter(topic, chain_id, self.run_id, self.producer_id,
                            data_classification or TOPIC_CLASSIFICATION[topic], head=head, codec=self.codec,
                            clock=self._clock, id_prefix=self._id_prefixes())
            self._writers[key] = w
        return w

    def append(self, chain_id: str, event_type: str, payload: dict, **header) -> Event:
        """Seal the next event of chain (topic of ``event_type``, ``chain_id``) and send it."""
        topic = schema_files.topic_of(event_type)
        w = self._writers.get((topic, chain_id)) or self.writer(topic, chain_id)
        event = w.append(event_type, payload, **header)
        self.sink.send(topic, chain_id, event.value)
        if self.signer is not None and topic != CHECKPOINT_TOPIC:
            pending = self._pending.get((topic, chain_id))
            if pending is None:
                pending = self._pending[(topic, chain_id)] = _Pending(event.seq, event.value[10:42], [])
            pending.hashes.append(event.event_hash)
            if len(pending.hashes) >= self.checkpoint_every:
                self._checkpoint_one(topic, chain_id)
        return event

    def appender(self, chain_id: str, event_type: str, *, policy_version: str = "", rule_version: str = "",
                 data_classification: str | None = None) -> Callable[..., Event]:
        """``append(payload, source_event_hashes=(), produced_at=None)``: ``append`` for one chain,
        event type and set of header strings, with everything constant encoded once (hot loops: the
        harness's step). See ``ChainWriter.sealer`` for the arguments. The events are the same
        bytes, sent and checkpointed the same way, as through ``append``; the sink, signer and
        ``checkpoint_every`` are the ones set when the appender is made."""
        topic = schema_files.topic_of(event_type)
        w = self._writers.get((topic, chain_id)) or self.writer(topic, chain_id)
        return self._deliver(topic, chain_id, w.sealer(event_type, policy_version=policy_version,
                                                       rule_version=rule_version,
                                                       data_classification=data_classification))

    def _deliver(self, topic: str, chain_id: str, seal: Callable[..., Event]) -> Callable[..., Event]:
        """``seal`` followed by sending the event and recording its checkpoint leaf."""
        send = self.sink.send
        if self.signer is None or topic == CHECKPOINT_TOPIC:
            def append(payload: dict, source_event_hashes: Sequence[bytes] = (),
                       produced_at: int | None = None) -> Event:
                event = seal(payload, source_event_hashes, produced_at)
                send(topic, chain_id, event.value)
                return event
            return append
        key, pending_of, every = (topic, chain_id), self._pending, self.checkpoint_every

        def append_checkpointed(payload: dict, source_event_hashes: Sequence[bytes] = (),
                                produced_at: int | None = None) -> Event:
            event = seal(payload, source_event_hashes, produced_at)
            send(topic, chain_id, event.value)
            pending = pending_of.get(key)
            if pending is None:
                pending = pending_of[key] = _Pending(event.seq, event.value[10:42], [])
            hashes = pending.hashes
            hashes.append(event.event_hash)
            if len(hashes) >= every:
                self._checkpoint_one(topic, chain_id)
            return event
        return append_checkpointed

    def heads(self) -> dict[tuple[str, str], ChainHead]:
        return {k: w.head for k, w in self._writers.items()}

    def checkpoint(self) -> list[Event]:
        """Sign a checkpoint for every chain with events since its last checkpoint."""
        return [self._checkpoint_one(t, c) for (t, c) in list(self._pending)]

    def _checkpoint_one(self, topic: str, chain_id: str) -> Event:
        pending = self._pending.pop((topic, chain_id))
        stmt = statement_for(topic, chain_id, pending.first_seq, pending.prev_head_hash, pending.hashes)
        assert self.signer is not None
        payload = checkpoint_payload(stmt, self.signer)
        return self.append(self._checkpoint_chain, "audit.checkpoint", payload,
                           source_event_hashes=[stmt.head_event_hash])

    def close(self) -> None:
        if self.signer is not None:
            self.checkpoint()
        close = getattr(self.sink, "flush", None)
        if close is not None:
            close()

