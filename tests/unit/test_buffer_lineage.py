"""An off-policy update names everything its buffer holds (learners.lineage.BufferLineage)."""
from __future__ import annotations

from eventlog.codec import default_codec
from eventlog.log import EventLog, MemorySink
from learners.dqn import DQN, DQNConfig
from learners.lineage import BufferLineage, emit_policy_update
from learners.replay import LineageRange, Replay
from producers.policies import RandomPolicy
from tests.unit.test_learners_support import MatchTarget, harness_run, replay_of


def _r(chain, first, last, seq0, seq1, head=b"h"):
    return LineageRange("marl.env.state", 0, first, last, chain, seq0, seq1, head.ljust(32, b"\0"))


def test_ranges_merge_batches_per_chain_and_forget_overwritten_ones():
    b = BufferLineage(capacity=10)
    b.add([_r("r:env", 0, 4, 0, 4, b"a")], 6)
    b.add([_r("r:env", 9, 12, 5, 8, b"b"), _r("r:obs", 5, 8, 0, 3, b"c")], 4)
    assert b.ranges() == [_r("r:env", 0, 12, 0, 8, b"b"), _r("r:obs", 5, 8, 0, 3, b"c")]
    b.add([_r("r:env", 20, 22, 9, 11, b"d")], 6)   # the newer two batches hold 10: the first is gone
    assert b.ranges()[0] == _r("r:env", 9, 22, 5, 11, b"d")
    b.add([], 0)                                     # an empty batch changes nothing
    c = BufferLineage(1)
    c.load_state_dict(b.state_dict())
    assert c.ranges() == b.ranges()


def test_dqn_update_names_every_batch_its_buffer_holds():
    env = MatchTarget()
    r1 = replay_of(harness_run(env, RandomPolicy(env, seed=1), episodes=3, seed=1))
    learner = DQN(r1.spec, DQNConfig(learning_starts=8, hidden_layers=(16,)))
    learner.update(r1)
    # a second batch later in the same topics: shift its offsets past the first's
    shifted = [LineageRange(x.topic, x.partition, x.first_offset + 1000, x.last_offset + 1000, x.chain_id,
                            x.first_seq + 500, x.last_seq + 500, x.head_event_hash) for x in r1.lineage]
    r2 = Replay(r1.spec, r1.episodes, shifted, r1.verified, r1.report)
    out = learner.update(r2)
    ev = emit_policy_update(EventLog(MemorySink(), run_id="r", producer_id="l"), learner, out, r2, parent_version="p")
    rec = default_codec().decode(ev.value)[1]
    by_chain = {x["chain_id"]: x for x in rec["lineage"]}
    for x in r1.lineage:  # each chain's range starts at batch 1 and ends at batch 2
        assert by_chain[x.chain_id]["first_offset"] == x.first_offset
        assert by_chain[x.chain_id]["last_offset"] == x.last_offset + 1000
    learner.config.buffer_size = learner.buffer_lineage.capacity = 1  # a tiny buffer keeps only the last batch
    learner.buffer_lineage.add(shifted, 5)
    assert all(r.first_offset >= 1000 for r in learner.buffer_lineage.ranges())
