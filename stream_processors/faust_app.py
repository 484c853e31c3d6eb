"""The same Processor as a faust-streaming app (``processing_guarantee="exactly_once"``).

NOT the exactly-once path of this project: ``stream_processors.worker`` is. faust-streaming 0.15.3
sends each output through the transactional producer of the output's *destination* partition
(faust/transport/consumer.py, ``TransactionManager.send``: ``transactional_id =
f"{app.conf.id}-{group}-{p}"``, p = destination partition) but commits each input offset in the
transaction of its *source* partition (``TransactionManager.commit``: ``f"{group_id}-{group}-
{tp.partition}"``), committing between an agent's sends (``Consumer.commit`` takes no lock against
agents). A credit event keyed ``{run}:credit`` derived from ``{run}:actions`` and ``{run}:env``
records (three different partitions in general) is therefore not atomic with its input offsets or
with the table row holding its chain head. Kept for the benchmark (bench/bench_processor.py).

Run: ``MARLGRC_BOOTSTRAP=... MARLGRC_TOPIC_PREFIX=... python -m stream_processors.faust_app worker -l warning``
"""
from __future__ import annotations

import os

import faust

from .processor import INPUT_TOPICS, Processor

BOOTSTRAP = os.environ.get("MARLGRC_BOOTSTRAP", "127.0.0.1:9092")
PREFIX = os.environ.get("MARLGRC_TOPIC_PREFIX", "")
NAME = os.environ.get("MARLGRC_FAUST_NAME", "di-faust")

app = faust.App(f"{PREFIX}marlgrc-{NAME}", broker=f"kafka://{BOOTSTRAP}", processing_guarantee="exactly_once",
                key_serializer="raw", value_serializer="raw", store="memory://", web_enabled=False,
                topic_partitions=3, datadir=os.environ.get("MARLGRC_FAUST_DATADIR", f"/tmp/marlgrc-faust-{NAME}"),
                consumer_auto_offset_reset="earliest", producer_acks=-1)

inputs = app.topic(*[PREFIX + t for t in INPUT_TOPICS], key_type=bytes, value_type=bytes)
outputs = {t: app.topic(PREFIX + t, key_type=bytes, value_type=bytes)
           for t in ("marl.di.credit", "marl.fairness.metrics", "marl.dlq")}
# rolling state per run (chain heads, normalizer, pending joins, fairness tallies), changelogged
state = app.Table("processor-state", default=None, partitions=3, key_type=bytes, value_type=bytes)

processor = Processor(consumer=NAME, producer_id=f"marlgrc-{NAME}", max_pending=None, max_states=None)
_restored = False


def _restore() -> None:
    global _restored
    for k, v in state.items():
        if k == b"":
            processor.restore_dlq(v)
        else:
            processor.restore(k.decode(), v)
    _restored = True


@app.agent(inputs)
async def interpret(stream):
    async for event in stream.events():
        if not _restored:
            _restore()
        m = event.message
        for ev in processor.feed(m.topic[len(PREFIX):], m.partition, m.offset, m.key, m.value):
            await outputs[ev.topic].send(key=ev.chain_id.encode(), value=ev.value)
        for run_id in processor.take_dirty():
            state[run_id.encode()] = processor.snapshot_dlq() if run_id == "" else processor.snapshot(run_id)


if __name__ == "__main__":
    app.main()
