"""MADDPG and SAC through the real broker: a few online iterations with every chain signed, the whole
run verifies with the signer's key, and each policy.update's lineage names everything the learner's
joint-transition buffer holds (every batch read so far, while the buffer keeps them), at the real
records' offsets."""
from __future__ import annotations

import pytest

from eventlog.checkpoint import Signer
from eventlog.codec import default_codec
from eventlog.kafka import read_records
from eventlog.verify import verify_records
from learners import algorithm
from learners.online import KafkaTransport
from learners.replay import RUN_TOPICS
from marlgrc.training import train_on_env
from tests.unit.test_learners_support import MatchTarget

pytestmark = pytest.mark.integration


@pytest.mark.timeout(240)
@pytest.mark.parametrize("algo,continuous", [("maddpg", True), ("maddpg", False), ("sac", True)],
                         ids=["maddpg-continuous", "maddpg-discrete", "sac-continuous"])
def test_offpolicy_online_through_kafka_verifies_and_names_its_buffer(kafka, topics, algo, continuous):
    signer = Signer.generate()
    run = f"{algo}{int(continuous)}"
    cfg = algorithm(algo).config_cls(seed=1, episodes_per_update=4, learning_starts=16, batch_size=16,
                                     train_frequency=8, hidden=16)
    transport = KafkaTransport(kafka.bootstrap, topics)
    try:
        res = train_on_env(MatchTarget(continuous=continuous), "match_target_v0", "0", algo, transport=transport,
                           iterations=3, seed=1, config=cfg, signer=signer, public_key=signer.public_key, run_id=run)
    finally:
        transport.close()
    assert [r["env_steps"] for r in res.curve] == [32, 64, 96]
    # 4 episodes x 7 stored joint transitions per batch (a truncated episode's last step is not stored)
    assert res.learner.buffer.size == 3 * 28 and res.curve[-1]["optimizer_steps"] > 0

    report = verify_records(read_records(kafka.bootstrap, [*RUN_TOPICS, "marl.policy.update"], prefix=topics),
                            signer.public_key)
    assert report.ok, [b.describe() for b in report.breaks]
    chains = [c for c in report.chains if c.chain_id.startswith(f"{run}:")]
    assert f"{run}:policy:{algo}" in {c.chain_id for c in chains}
    assert all(c.signed_through_seq == c.last_seq >= 0 for c in chains)

    codec = default_codec()
    ups = [codec.decode(r.value)[1] for r in read_records(kafka.bootstrap, ["marl.policy.update"], prefix=topics)]
    ups = [u for u in ups if u["chain_id"] == f"{run}:policy:{algo}"]
    assert [u["event_hash"] for u in ups] == res.update_hashes
    assert all(u["algorithm"] == algo and u["verified"] for u in ups) and ups[-1]["policy_updated"]
    assert ups[-1]["weights_sha256"] == res.learner.weights_sha256()
    # the buffer (100,000 joint transitions) still holds every batch: update k names batches 1..k of each
    # chain, from the first batch's first event to the k-th batch's last, whose hash is its head
    acts = {(r.partition, r.offset): r.value for r in read_records(kafka.bootstrap, ["marl.joint.action"],
                                                                    prefix=topics) if r.key == f"{run}:actions"}
    for k, u in enumerate(ups, start=1):
        x = next(r for r in u["lineage"] if r["chain_id"] == f"{run}:actions")
        assert (x["first_seq"], x["last_seq"]) == (0, 32 * k - 1)
        assert x["first_offset"] == min(o for _, o in acts)
        assert acts[(x["partition"], x["last_offset"])][-32:] == x["head_event_hash"]
        assert set(u["source_event_hashes"]) == {r["head_event_hash"] for r in u["lineage"]}
