"""Batch mode: the same Processor over a replayed range of the input topics (``marlgrc reprocess``)."""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

from eventlog.chain import Event
from eventlog.checkpoint import Signer
from eventlog.codec import HEADER_FIELDS, default_codec
from eventlog.kafka import Record, record_batches

from .processor import INPUT_TOPICS, Processor

# header fields that differ between two writes of the same content (identity, time, hash links)
VOLATILE = frozenset({"event_id", "produced_at", "retention_expiry", "prev_event_hash", "event_hash", "producer_id"})


def run_records(records: Iterable[Record], run_id: str) -> Iterator[Record]:
    """The records of one run's input chains (``{run}:...`` keys)."""
    head = f"{run_id}:"
    return (r for r in records if r.key.startswith(head))


def reprocess_records(records: Iterable[Record], processor: Processor) -> list[Event]:
    """The processor's events for ``records``, then what ``finish()`` gives, then (with a signer) the
    checkpoints that sign all of them, checkpoint chains included."""
    out: list[Event] = []
    for r in records:
        out.extend(processor.feed(r.topic, r.partition, r.offset, r.key, r.value))
    out += processor.finish()
    return out + processor.checkpoint()


def reprocess(bootstrap: str, run_id: str, *, prefix: str = "", rules_override: str | None = None,
              default_env: str = "passthrough", credit_stream: str = "credit", fairness_stream: str = "fairness",
              start_timestamp_ms: int | None = None, signer: Signer | None = None,
              progress: Callable[[int], None] | None = None) -> list[Event]:
    """Replay ``run_id``'s lifecycle, env.state and joint.action records (from the beginning, or from
    ``start_timestamp_ms``) through a fresh Processor; return the sealed events, not yet sent.
    ``progress(n)``: ``n`` more input records (of every run) read and processed.

    ``signer``: for results that will be written (``marlgrc reprocess --write``): the events end with
    the checkpoints signing every chain, on ``{run}:checkpoints:marlgrc-reprocess-{credit stream}`` (a
    checkpoint chain per output stream, so two reprocessings with different rules do not fork one)."""
    producer = "marlgrc-reprocess" if credit_stream == "credit" else \
        f"marlgrc-reprocess-{credit_stream.replace(':', '-')}"
    p = Processor(consumer=f"reprocess:{run_id}", producer_id=producer, default_env=default_env,
                  rules_override=rules_override, max_pending=None, max_states=None,
                  credit_stream=credit_stream, fairness_stream=fairness_stream, signer=signer)

    def recs() -> Iterator[Record]:
        for batch in record_batches(bootstrap, INPUT_TOPICS, prefix=prefix, start_timestamp_ms=start_timestamp_ms,
                                    timestamps=True):
            yield from map(Record._make, batch)
            if progress is not None:
                progress(len(batch))

    return reprocess_records(run_records(recs(), run_id), p)


def comparable(value: bytes) -> dict:
    """An event's content without the fields that differ between two writes of the same content.
    A fairness event's sources are credit events, whose hashes cover their write time, so they go too."""
    _, rec = default_codec().decode(value)
    drop = VOLATILE | ({"source_event_hashes"} if rec["event_type"] == "fairness.metrics" else set())
    return {k: v for k, v in rec.items() if k not in drop}


def payload_fields(value: bytes) -> dict:
    """Only the payload (fields after the header)."""
    _, rec = default_codec().decode(value)
    return {k: v for k, v in rec.items() if k not in HEADER_FIELDS and k != "event_hash"}
