"""EventLog: the chain writers of one process, where they send, and their signed checkpoints."""
from __future__ import annotations

import functools
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

    def send(self, topic: str, key: str, value: bytes) -> None:
        """Queue one event. Raises only for an event it did not queue (its writer then takes the
        event back); failures of events queued earlier are raised by the next send before it queues."""


@dataclass
class MemorySink:
    """Keeps (topic, key, value) in order; for tests, vectors and offline bundles."""

    sent: list[tuple[str, str, bytes]] = field(default_factory=list)

    def send(self, topic: str, key: str, value: bytes) -> None:
        self.sent.append((topic, key, value))


@dataclass
class _Pending:
    """A chain's events since its last checkpoint: ``first_seq`` and ``prev_head_hash`` are set by
    the first of them (``EventLog._mark``); ``hashes`` is emptied in place by each checkpoint."""

    first_seq: int = -1
    prev_head_hash: bytes = b""
    hashes: list[bytes] = field(default_factory=list)


def _send(send: Callable[[str, str, bytes], None], writer: ChainWriter, event: Event) -> None:
    """Send a sealed event; if the sink refuses it (raises an Exception: a ``Sink`` raises only for an
    event it did not queue), the event never happened: the writer's head goes back to the event
    before it and the sink's error is raised. An interrupt is raised as
    it is, head unchanged: a gap the verifier reports rather than a seq written twice."""
    try:
        send(event.topic, event.chain_id, event.value)
    except Exception:
        writer.head = ChainHead(event.seq - 1, event.value[10:42])
        raise


class EventLog:
    """All chains one process writes for one run, with periodic signed checkpoints.

    Every ``checkpoint_every`` events of a chain, and for every chain on ``checkpoint()`` /
    ``close()``, a checkpoint event naming that chain's new range goes to
    ``marl.audit.checkpoints`` on the chain ``{run_id}:checkpoints:{producer_id}``; ``checkpoint()``
    ends with a checkpoint of that chain itself, so when the log closes every event it wrote is
    covered by a signature.
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
        # chains with events since their last checkpoint, in the order of the first of them
        self._active: dict[tuple[str, str], _Pending] = {}
        self._checkpoint_chain = f"{run_id}:checkpoints:{producer_id}"
        self._self_signed_seq = -1  # seq of the checkpoint chain's last checkpoint of itself

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
        _send(self.sink.send, w, event)
        pending = self._pending_of(topic, chain_id)
        if pending is not None:
            pending.hashes.append(event.event_hash)
            n = len(pending.hashes)
            every = self._every(topic)
            if n == 1 or n >= every:
                self._mark(topic, chain_id, pending, every, event, n)
        return event

    def _pending_of(self, topic: str, chain_id: str) -> _Pending | None:
        """The chain's record of events to checkpoint; None when nothing is signed (no signer)."""
        if self.signer is None:
            return None
        pending = self._pending.get((topic, chain_id))
        if pending is None:
            pending = self._pending[(topic, chain_id)] = _Pending()
        return pending

    def _every(self, topic: str) -> float:
        """Events of a chain per checkpoint; the checkpoint chain is signed by ``checkpoint()`` only
        (each of its checkpoints is an event on it, which the next one covers)."""
        return float("inf") if topic == CHECKPOINT_TOPIC else self.checkpoint_every

    def _mark(self, topic: str, chain_id: str, pending: _Pending, every: int, event: Event, n: int) -> None:
        """After ``event`` made ``n`` hashes pending on its chain: the first one opens the range the
        next checkpoint covers; ``every`` of them sign it."""
        if n == 1:
            pending.first_seq, pending.prev_head_hash = event.seq, event.value[10:42]
            self._active[(topic, chain_id)] = pending
        if n >= every:
            self._checkpoint_one(topic, chain_id)

    def appender(self, chain_id: str, event_type: str, *, policy_version: str = "", rule_version: str = "",
                 data_classification: str | None = None) -> Callable[..., Event]:
        """``append(payload, source_event_hashes=(), produced_at=None)``: ``append`` for one chain,
        event type and set of header strings, with everything constant encoded once (hot loops: the
        harness's step). See ``ChainWriter.sealer`` for the arguments. The events are the same
        bytes, sent and checkpointed the same way, as through ``append``; the sink, signer and
        ``checkpoint_every`` are the ones set when the appender is made."""
        topic = schema_files.topic_of(event_type)
        w = self._writers.get((topic, chain_id)) or self.writer(topic, chain_id)
        return self._deliver(w, w.sealer(event_type, policy_version=policy_version,
                                                       rule_version=rule_version,
                                                       data_classification=data_classification))

    def _deliver(self, w: ChainWriter, seal: Callable[..., Event]) -> Callable[..., Event]:
        """``seal`` followed by sending the event and recording its checkpoint leaf."""
        topic, chain_id, send = w.topic, w.chain_id, self.sink.send
        pending = self._pending_of(topic, chain_id)
        every = self._every(topic)
        mark = None if pending is None else functools.partial(self._mark, topic, chain_id, pending, every)
        if pending is None:
            def append(payload: dict, source_event_hashes: Sequence[bytes] = (),
                       produced_at: int | None = None) -> Event:
                event = seal(payload, source_event_hashes, produced_at)
                _send(send, w, event)
                return event
            return append
        hashes = pending.hashes

        def append_checkpointed(payload: dict, source_event_hashes: Sequence[bytes] = (),
                                produced_at: int | None = None) -> Event:
            event = seal(payload, source_event_hashes, produced_at)
            _send(send, w, event)
            hashes.append(event.event_hash)
            n = len(hashes)
            if n == 1 or n >= every:
                mark(event, n)
            return event
        return append_checkpointed

    def heads(self) -> dict[tuple[str, str], ChainHead]:
        return {k: w.head for k, w in self._writers.items()}

    def checkpoint(self) -> list[Event]:
        """Sign a checkpoint for every chain with events since its last checkpoint, then one for the
        checkpoint chain itself, covering everything on it up to that last checkpoint event."""
        own = (CHECKPOINT_TOPIC, self._checkpoint_chain)
        events = [self._checkpoint_one(t, c) for (t, c) in list(self._active) if (t, c) != own]
        pending = self._active.get(own)
        # nothing new on the checkpoint chain since it signed itself: no checkpoint of one checkpoint
        if pending is not None and not (len(pending.hashes) == 1 and pending.first_seq == self._self_signed_seq):
            events.append(self._checkpoint_one(*own))
            self._self_signed_seq = events[-1].seq
        return events

    def _checkpoint_one(self, topic: str, chain_id: str) -> Event:
        pending = self._active.pop((topic, chain_id))
        stmt = statement_for(topic, chain_id, pending.first_seq, pending.prev_head_hash, pending.hashes)
        pending.hashes.clear()  # in place: the chain's appenders hold this list
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

