"""Fairness metrics from ``marl.di.credit`` as a faust-streaming app, exactly once.

The metrics and their windows are ``fairness.py``'s, the same as the DI worker's ``{run}:fairness``
chain (every window both emit has the same payload and rule_version); this module adds what the app
needs around them: per credit chain (``{run}:credit``) one ``ChainState`` with the last input offset
processed, the heads of its two output chains and the state of its checkpoint chain, and the faust
wiring.

Outputs, per input credit event, at most one event per fairness chain:

- ``{run}:fairness:faust:episode``: an episode's metrics, emitted when the next episode's first
  credit arrives (a credit event does not say whether the episode ended, so the run's last episode
  is not closed here; the DI worker also closes an episode on all-done);
- ``{run}:fairness:faust:sliding``: the last ``WINDOW`` credits, every ``HOP`` credits.

With ``MARLGRC_SIGNING_KEY`` (an Ed25519 PEM, the home's ``keys/signing.pem``), every input record
that seals events also signs them (``signing.sign``): one ``audit.checkpoint`` per chain it wrote, on
``{run}:checkpoints:marlgrc-{name}`` (a dead letter's on ``dlq:{name}:p{n}:checkpoints:marlgrc-{name}``), then
one checkpoint of that checkpoint chain itself. They are attached to the record with its outputs and
its table row (which keeps the checkpoint chain's state), so whatever a commit publishes is signed
through its head.

Run (one worker per partition set; ``marlgrc process --faust-fairness`` starts it)::

    MARLGRC_BOOTSTRAP=HOST:PORT MARLGRC_TOPIC_PREFIX=P MARLGRC_SIGNING_KEY=PEM \
        python -m stream_processors.faust_fairness worker -l warning
    # or: faust -A stream_processors.faust_fairness worker -l warning

Why faust's ``exactly_once`` is sound HERE (and not for the decision interpreter's join), in
faust-streaming 0.15.3, with the four rules this module keeps (docs/PROCESSORS.md has the source
lines):

1. One transaction per *partition number*: faust's transactional id is ``{app id}-{topic group}-
   {partition}`` both for a send (destination partition) and for an offset commit (source partition),
   and topics with the same partition count form one topic group. Every output of an input record -
   fairness events, dead letters, checkpoints AND the table's changelog row - is sent to the *input
   record's partition number*. All topics involved have 3 partitions and are subscribed (the output topics by
   the ``committed_outputs`` agent, which also counts them), so output, changelog and offset of one
   record share one transaction. Every event of a chain still lands in one partition: a run's credit
   chain is in one partition, and so are its fairness and checkpoint chains; dead letters (and their
   checkpoint chains) use a chain per partition.
2. Outputs are *attached* to the input record (``stream_publish_on_commit``): faust publishes them in
   the commit, right before ``send_offsets_to_transaction``, never earlier. The table row is attached
   the same way (faust's own ``table[k] = v`` goes through the producer buffer, which a commit does
   not flush, so a row could land in a later transaction than its offset); the local store is written
   directly. All of one record's attachments and its store write happen with no ``await`` in between,
   so a concurrent commit sees all of them or none.
3. Idempotent: faust's commit publishes the attachments of offsets ``<=`` the committed position,
   which includes the record being processed; its offset is then committed *before* it, so after a
   crash it is delivered again. The table row of its chain holds the last input offset processed and
   the output chain heads; a record at or below it is skipped.
4. A record's attachments are published in the order they were attached (``_Outputs``): faust keys
   them by the record's offset in a heap, where equal keys come out in no fixed order; each gets a
   key of its own in ``(offset - 1, offset)``, so a commit position (an integer) takes all of them or
   none, in order. A record's events on one chain (checkpoints and their self-checkpoint) stay in seq
   order.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from fractions import Fraction
from hashlib import sha256
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import faust

from eventlog.chain import ChainHead, ChainWriter, Event
from eventlog.checkpoint import Signer
from eventlog.codec import DecodeError, default_codec

from . import fairness as fair
from .signing import CHECKPOINT_TOPIC, CheckpointChain, Unsigned, checkpoint_chain_id, sign

BOOTSTRAP = os.environ.get("MARLGRC_BOOTSTRAP", "127.0.0.1:9092")
PREFIX = os.environ.get("MARLGRC_TOPIC_PREFIX", "")
NAME = os.environ.get("MARLGRC_FAUST_NAME", "fairness-faust")
METRICS_PORT = int(os.environ.get("MARLGRC_METRICS_PORT", "0") or 0)
SIGNING_KEY = os.environ.get("MARLGRC_SIGNING_KEY", "")
"""Ed25519 key file (PEM, mode 0600) that signs the app's chains; empty: they stay unsigned."""
PARTITIONS = 3  # eventlog.topics.topic_specs(): every marl.* topic; the table's changelog gets the same

IN_TOPIC, OUT_TOPIC, DLQ_TOPIC = "marl.di.credit", "marl.fairness.metrics", "marl.dlq"
PRODUCER_ID = f"marlgrc-{NAME}"

log = logging.getLogger("marlgrc.faust_fairness")
signer: Signer | None = Signer.load(Path(SIGNING_KEY)) if SIGNING_KEY else None


@dataclass
class ChainState:
    """What the app keeps per credit chain (a few KB, in the table): idempotency and output heads
    around the chain's fairness windows."""

    last_offset: int = -1
    episode_head: ChainHead = field(default_factory=ChainHead)
    sliding_head: ChainHead = field(default_factory=ChainHead)
    windows: fair.Windows = field(default_factory=fair.Windows)
    checkpoints: CheckpointChain = field(default_factory=CheckpointChain)   # {run}:checkpoints:{producer}

    def to_bytes(self) -> bytes:
        return json.dumps({
            "last_offset": self.last_offset,
            "episode_head": [self.episode_head.seq, self.episode_head.event_hash.hex()],
            "sliding_head": [self.sliding_head.seq, self.sliding_head.event_hash.hex()],
            **self.windows.to_json(),
            "checkpoints": self.checkpoints.to_json(),
        }, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes | None) -> "ChainState":
        if not data:
            return cls()
        d = json.loads(data)
        return cls(d["last_offset"], ChainHead(d["episode_head"][0], bytes.fromhex(d["episode_head"][1])),
                   ChainHead(d["sliding_head"][0], bytes.fromhex(d["sliding_head"][1])), fair.Windows.from_json(d),
                   CheckpointChain.from_json(d.get("checkpoints")))  # rows saved before the app signed: none


def step(state: ChainState, offset: int, rec: Mapping, credit_hash: bytes, *, window: int = fair.WINDOW,
         hop: int = fair.HOP) -> list[fair.Window]:
    """Apply one decoded credit record (at input ``offset``) to ``state`` (mutated); returns the
    fairness windows to seal. Nothing, and no change, when ``offset <= state.last_offset`` (already
    processed). Raises ``fair.InvalidCredit`` (or KeyError, TypeError, ValueError) before any change."""
    if offset <= state.last_offset:
        return []
    o = fair.outcome(rec)
    episode = int(rec["episode"])
    out = state.windows.add(episode, o, credit_hash, f"{rec.get('rule_version', '')};{fair.VERSION}",
                            size=window, hop=hop)
    state.last_offset = offset
    return out


def output_chain(credit_chain: str, kind: str) -> str | None:
    """``{run}:credit`` -> ``{run}:fairness:faust:{kind}``; None for other chains on marl.di.credit
    (e.g. ``{run}:credit:reprocess:...``), which this app leaves alone."""
    if not credit_chain.endswith(":credit"):
        return None
    return f"{credit_chain[:-len(':credit')]}:fairness:faust:{kind}"


app = faust.App(
    f"{PREFIX}marlgrc-{NAME}", broker=f"kafka://{BOOTSTRAP}", processing_guarantee="exactly_once",
    stream_publish_on_commit=True, key_serializer="raw", value_serializer="raw", store="memory://",
    web_enabled=False, topic_partitions=PARTITIONS, consumer_auto_offset_reset="earliest", producer_acks=-1,
    datadir=os.environ.get("MARLGRC_FAUST_DATADIR", f"/tmp/marlgrc-faust-{PREFIX}{NAME}"),
    table_standby_replicas=0,
    broker_commit_interval=float(os.environ.get("MARLGRC_FAUST_COMMIT_INTERVAL", "2.8")),
    broker_commit_every=int(os.environ.get("MARLGRC_FAUST_COMMIT_EVERY", "10000")),
    # a SIGKILLed member holds its partitions until the session times out: the restart waits that long
    broker_session_timeout=float(os.environ.get("MARLGRC_FAUST_SESSION_TIMEOUT", "10")),
    broker_heartbeat_interval=float(os.environ.get("MARLGRC_FAUST_HEARTBEAT", "1")),
)
credits_in = app.topic(PREFIX + IN_TOPIC, key_type=bytes, value_type=bytes)
fairness_out = app.topic(PREFIX + OUT_TOPIC, key_type=bytes, value_type=bytes)
dlq_out = app.topic(PREFIX + DLQ_TOPIC, key_type=bytes, value_type=bytes)
checkpoints_out = app.topic(PREFIX + CHECKPOINT_TOPIC, key_type=bytes, value_type=bytes)
# per credit chain: ChainState bytes; per partition (b"\0dlq:<p>"): [last offset, seq, head hash hex,
# *CheckpointChain.to_json() of its checkpoint chain] (rows saved before the app signed: the first three)
state = app.Table("fairness-state", default=None, partitions=PARTITIONS, key_type=bytes, value_type=bytes)

codec = default_codec()


class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        p = "marlgrc_fairness_faust"
        self.events_in = Counter(f"{p}_events_in", "credit records in", registry=r)
        self.events_out = Counter(f"{p}_events_out", "events attached for output", ["topic"], registry=r)
        self.committed_out = Counter(f"{p}_committed_out", "output events read back committed", ["topic"],
                                     registry=r)
        self.dead = Counter(f"{p}_dead_letters", "dead letters", ["error_kind"], registry=r)
        self.skipped = Counter(f"{p}_skipped", "records at or below a chain's last processed offset", registry=r)
        self.ignored = Counter(f"{p}_ignored", "credit records of chains other than {run}:credit", registry=r)
        self.lag = Gauge(f"{p}_consumer_lag", "high watermark - next offset", ["partition"], registry=r)
        self.latency = Histogram(f"{p}_latency_seconds", "processing time per record", registry=r,
                                 buckets=(1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.1))


metrics = _Metrics()
_cache: dict[bytes, tuple[bytes, ChainState]] = {}  # key -> (stored bytes, decoded), valid while identical


def _load(key: bytes) -> ChainState:
    raw = state.data.get(key)
    hit = _cache.get(key)
    if hit is not None and raw is not None and hit[0] is raw:
        return hit[1]
    return ChainState.from_bytes(raw)


class _Place(NamedTuple):
    """What faust's ``Attachments.put`` reads of a message: its partition and the key its attachment
    is kept under (published once the commit position reaches it)."""

    tp: Any
    offset: Fraction


class _Outputs:
    """One input record's attachments (rule 4 in the module docstring): published by faust's commit in
    the order attached, all of them or none. Nothing here yields to the event loop (rule 2)."""

    def __init__(self, event) -> None:
        self._tp, self._offset, self._n = event.message.tp, event.message.offset, 0

    def __call__(self, channel, key: bytes, value: bytes, partition: int) -> None:
        # what Event._attach does with stream_publish_on_commit on, under an ordered key of our own
        self._n += 1
        place = _Place(self._tp, self._offset - Fraction(1, self._n + 1))
        app._attachments.put(place, channel, key, value, partition=partition,
                             key_serializer="raw", value_serializer="raw")


def _signed(attach: _Outputs, chain: CheckpointChain, owner: str, run_id: str,
            sealed: list[tuple[ChainHead, Event]], partition: int) -> CheckpointChain:
    """Sign ``sealed`` ((head before, event) per output event) on the checkpoint chain
    ``{owner}:checkpoints:{PRODUCER_ID}`` at ``chain`` and attach the checkpoints; the chain's new
    state. Unchanged without a signing key."""
    if signer is None or not sealed:
        return chain
    w = ChainWriter(CHECKPOINT_TOPIC, checkpoint_chain_id(owner, PRODUCER_ID), run_id, PRODUCER_ID, head=chain.head,
                    codec=codec)
    events, chain = sign(w, chain, [Unsigned(prev, [ev.event_hash]).statement(ev.topic, ev.chain_id)
                                    for prev, ev in sealed], signer)
    for ev in events:
        attach(checkpoints_out, w.chain_id.encode(), ev.value, partition)
        metrics.events_out.labels(CHECKPOINT_TOPIC).inc()
    return chain


def _dead(event, p: int, o: int, key: bytes, value: bytes, kind: str, reason: str) -> None:
    dkey = b"\0dlq:%d" % p
    raw = state.data.get(dkey)
    row = json.loads(raw) if raw is not None else [-1, -1, bytes(32).hex()]
    last, head = row[0], ChainHead(row[1], bytes.fromhex(row[2]))
    if o <= last:
        metrics.skipped.inc()
        return
    cps = CheckpointChain.from_json(row[3:] if len(row) > 3 else None)
    chain = f"dlq:{NAME}:p{p}"
    w = ChainWriter(DLQ_TOPIC, chain, "", PRODUCER_ID, head=head, codec=codec)
    ev = w.append("dead.letter", {
        "source_topic": IN_TOPIC, "source_partition": p, "source_offset": o, "source_key": key,
        "error_kind": kind, "reason": reason, "consumer": NAME, "payload": value,
        "payload_sha256": sha256(value).digest()})
    attach = _Outputs(event)
    attach(dlq_out, chain.encode(), ev.value, p)
    cps = _signed(attach, cps, chain, "", [(head, ev)], p)
    row = json.dumps([o, w.head.seq, w.head.event_hash.hex(), *cps.to_json()]).encode()
    attach(state.changelog_topic, dkey, row, p)
    state.data[dkey] = row
    metrics.events_out.labels(DLQ_TOPIC).inc()
    metrics.dead.labels(kind).inc()


def handle(event) -> None:
    """One input record, synchronously: outputs, their checkpoints, table row and store write, or a
    dead letter."""
    m = event.message
    p, o = m.partition, m.offset
    key, value = m.key or b"", m.value
    metrics.events_in.inc()
    if value is None:
        return _dead(event, p, o, key, b"", "empty", "record has no value (tombstone?)")
    try:
        name, rec = codec.decode(value)
    except DecodeError as exc:
        return _dead(event, p, o, key, value, exc.kind, str(exc))
    if sha256(memoryview(value)[:-32]).digest() != value[-32:]:
        return _dead(event, p, o, key, value, "integrity",
                     f"{name} event_hash does not match SHA-256 of its bytes: edited in transit")
    if name != "credit_assignment":
        return _dead(event, p, o, key, value, "wrong_schema", f"a {name} event on {IN_TOPIC}, which carries di.credit")
    chain = rec["chain_id"]
    out_chains = {k: output_chain(chain, k) for k in ("episode", "sliding")}
    if out_chains["episode"] is None:
        metrics.ignored.inc()
        return None
    skey = chain.encode()
    st = _load(skey)
    if o <= st.last_offset:
        metrics.skipped.inc()
        return None
    try:
        outs = step(st, o, rec, bytes(value[-32:]))
    except (fair.InvalidCredit, KeyError, TypeError, ValueError) as exc:
        _cache.pop(skey, None)  # step validates before mutating, but never trust a half-applied state
        return _dead(event, p, o, key, value, "invalid", f"di.credit {chain} seq {rec.get('seq')}: {exc}")
    run_id = rec["run_id"]
    attach = _Outputs(event)
    sealed = []
    for win in outs:
        head = st.episode_head if win.kind == "episode" else st.sliding_head
        w = ChainWriter(OUT_TOPIC, out_chains[win.kind], run_id, PRODUCER_ID, head=head, codec=codec)
        ev = w.append("fairness.metrics", win.payload, rule_version=win.rule_version, source_event_hashes=win.sources)
        sealed.append((head, ev))
        if win.kind == "episode":
            st.episode_head = w.head
        else:
            st.sliding_head = w.head
        attach(fairness_out, out_chains[win.kind].encode(), ev.value, p)
        metrics.events_out.labels(OUT_TOPIC).inc()
    st.checkpoints = _signed(attach, st.checkpoints, chain[:-len(":credit")], run_id, sealed, p)
    row = st.to_bytes()
    attach(state.changelog_topic, skey, row, p)
    state.data[skey] = row
    _cache[skey] = (row, st)
    return None


@app.agent(credits_in)
async def fairness_from_credit(stream):
    async for event in stream.events():
        t0 = time.perf_counter()
        handle(event)
        metrics.latency.observe(time.perf_counter() - t0)
        try:
            hw = app.consumer.highwater(event.message.tp)
            if hw is not None:
                metrics.lag.labels(str(event.message.partition)).set(max(0, hw - event.message.offset - 1))
        except Exception:  # noqa: BLE001 - lag is advisory
            pass


@app.agent(app.topic(PREFIX + OUT_TOPIC, PREFIX + DLQ_TOPIC, PREFIX + CHECKPOINT_TOPIC, key_type=bytes, value_type=bytes))
async def committed_outputs(stream):
    """Subscribes the output topics, which puts them in faust's topic groups (a transactional send to a
    topic outside every group fails in 0.15.3), and counts what was committed (read_committed); on the
    checkpoint topic, which every signing writer shares, only this app's checkpoints."""
    async for event in stream.events():
        topic = event.message.topic[len(PREFIX):]
        if topic != CHECKPOINT_TOPIC or _ours(event.message.key or b""):
            metrics.committed_out.labels(topic).inc()


def _ours(checkpoint_key: bytes) -> bool:
    return checkpoint_key.decode("utf-8", "replace").rpartition(":checkpoints:")[2] == PRODUCER_ID


@app.task
async def _serve_metrics() -> None:
    if METRICS_PORT:
        from prometheus_client import start_http_server

        start_http_server(METRICS_PORT, addr="127.0.0.1", registry=metrics.registry)
        log.info("metrics on http://127.0.0.1:%d/metrics", METRICS_PORT)


def main() -> None:
    app.main()


if __name__ == "__main__":
    main()
