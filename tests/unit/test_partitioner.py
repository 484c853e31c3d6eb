"""Topic placement and configs (docs/HASHING.md, "Partitions"): every chain of a run goes to one partition number
on every topic, Kafka's murmur2 of the run id modulo the topic's partition count.

Pure: the hash against Kafka's own test vectors, the placement rule and its spread over runs. The
placement on a real broker, and librdkafka's murmur2 partitioner agreeing with it, are checked in
tests/integration/test_cluster_faults.py."""
from collections import Counter

import pytest

import schemas as schema_files
from eventlog.topics import murmur2, run_hash, run_of, run_partition, topic_specs

# org.apache.kafka.common.utils.UtilsTest#testMurmur2 (Kafka's own vectors for Utils.murmur2)
KAFKA_VECTORS = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


@pytest.mark.parametrize("data,expected", sorted(KAFKA_VECTORS.items()))
def test_murmur2_is_kafkas(data, expected):
    assert murmur2(data) == expected


def test_murmur2_covers_every_tail_length_and_the_empty_key():
    # 0-3 trailing bytes take different branches; each must give a 32-bit signed int, deterministic
    for n in range(0, 9):
        h = murmur2(b"x" * n)
        assert -(2 ** 31) <= h < 2 ** 31 and h == murmur2(b"x" * n)
    assert len({murmur2(b"x" * n) for n in range(0, 9)}) == 9


def test_the_run_id_is_the_chain_id_up_to_its_first_colon():
    assert run_of("r1:actions") == "r1"
    assert run_of("r1:obs:agent_0") == "r1"
    assert run_of("r1:checkpoints:producer-7") == "r1"
    assert run_of("no-colon") == "no-colon"
    assert run_hash("r1:env") == murmur2(b"r1") & 0x7FFFFFFF


def test_every_chain_of_a_run_lands_in_the_same_partition_of_every_topic():
    specs = topic_specs()
    counts = {s.partitions for s in specs}
    assert counts == {3}  # the same count on every marl.* topic: the same partition number on each
    streams = ["lifecycle", "env", "actions", "obs:agent_0", "obs:agent_1", "credit", "fairness",
               "checkpoints:marlgrc-run"]
    for run in ("r1", "mailbox_v0__ppo__1__1767225600-a1b2c3", "ünïcode", "a" * 200):
        places = {run_partition(f"{run}:{s}", 3) for s in streams for _ in schema_files.TOPICS}
        assert len(places) == 1
        assert places == {(murmur2(run.encode()) & 0x7FFFFFFF) % 3}
    # other counts: still one place per run (the same rule on a topic of n partitions)
    for n in (1, 2, 6, 12):
        assert len({run_partition(f"r9:{s}", n) for s in streams}) == 1
        assert 0 <= run_partition("r9:env", n) < n


def test_runs_spread_over_the_partitions():
    runs = [f"run-{i}" for i in range(3000)]
    for n in (3, 6):
        load = Counter(run_partition(f"{r}:actions", n) for r in runs)
        assert set(load) == set(range(n))
        expected = len(runs) / n
        # a fair hash: chi-square with n-1 degrees of freedom far below the 0.1% tail (16.3 for 5 dof)
        chi2 = sum((c - expected) ** 2 / expected for c in load.values())
        assert chi2 < 16.3, (n, load)


def test_a_topic_without_partitions_is_refused():
    with pytest.raises(ValueError, match="at least one partition"):
        run_partition("r1:env", 0)


def test_a_compacted_state_topic_is_cleaned_often_and_audit_topics_never():
    from eventlog.topics import TopicSpec

    state = TopicSpec("marl.processor.state", 1, "internal", compacted=True).config
    assert state["cleanup.policy"] == "compact"
    assert int(state["segment.ms"]) <= 3_600_000 and int(state["segment.bytes"]) <= 64 * 1024 * 1024
    assert float(state["min.cleanable.dirty.ratio"]) <= 0.1
    for spec in topic_specs():  # a hash chain is never compacted
        assert spec.config["cleanup.policy"] == "delete" and "segment.ms" not in spec.config


class _Metadata:
    """What confluent-kafka's list_topics returns, for RunPartitioner's lookups (a unit test of the
    placement rule around metadata that lags; the real broker is in test_cluster_faults.py)."""

    def __init__(self, visible_after: int, partitions: int):
        self.asked, self.visible_after, self.partitions = 0, visible_after, partitions

    def list_topics(self, topic, timeout):
        from types import SimpleNamespace

        self.asked += 1
        if self.asked < self.visible_after:
            return SimpleNamespace(topics={})
        tm = SimpleNamespace(error=None, partitions={p: object() for p in range(self.partitions)})
        return SimpleNamespace(topics={topic: tm})


def test_a_topic_the_metadata_does_not_show_yet_is_asked_again_never_placed_by_the_client():
    from eventlog.kafka import RunPartitioner

    md = _Metadata(visible_after=3, partitions=6)
    place = RunPartitioner(md, timeout=5.0)
    assert place("t.marl.env.state", "r7:env") == run_partition("r7", 6)
    assert md.asked == 3
    assert place("t.marl.env.state", "r8:env") == run_partition("r8", 6) and md.asked == 3  # cached


def test_a_topic_that_never_appears_gets_none_and_is_not_asked_at_every_send():
    from eventlog.kafka import RunPartitioner

    md = _Metadata(visible_after=10**9, partitions=3)
    place = RunPartitioner(md, timeout=0.3, retry_after=60)
    assert place("t.missing", "r1:env") is None
    asked = md.asked
    assert asked >= 2  # asked again within the timeout
    assert place("t.missing", "r1:env") is None and md.asked == asked
