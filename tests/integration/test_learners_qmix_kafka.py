"""QMIX through the real broker: online training with every chain signed, the whole run verifies with
the signer's key, and each policy.update's lineage names everything QMIX's episode buffer holds (every
batch read so far, while the buffer keeps them), at the real records' offsets."""
from __future__ import annotations

import pytest

from eventlog.checkpoint import Signer
from eventlog.codec import default_codec
from eventlog.kafka import read_records
from eventlog.verify import verify_records
from learners.online import KafkaTransport
from learners.qmix import QMIXConfig
from learners.replay import RUN_TOPICS
from marlgrc.training import train_on_env
from tests.unit.test_learners_support import MatchTarget

pytestmark = pytest.mark.integration


@pytest.mark.timeout(240)
def test_qmix_online_through_kafka_verifies_and_names_its_buffer(kafka, topics):
    signer = Signer.generate()
    transport = KafkaTransport(kafka.bootstrap, topics)
    try:
        res = train_on_env(MatchTarget(), "match_target_v0", "0", "qmix", transport=transport, iterations=3, seed=1,
                           config=QMIXConfig(seed=1, episodes_per_update=4, learning_starts=4, batch_size=4,
                                             train_frequency=16, hidden_layers=(16,)),
                           signer=signer, public_key=signer.public_key, run_id="qmix1")
    finally:
        transport.close()
    assert [r["env_steps"] for r in res.curve] == [32, 64, 96]

    report = verify_records(read_records(kafka.bootstrap, [*RUN_TOPICS, "marl.policy.update"], prefix=topics),
                            signer.public_key)
    assert report.ok, [b.describe() for b in report.breaks]
    chains = [c for c in report.chains if c.chain_id.startswith("qmix1:")]
    assert "qmix1:policy:qmix" in {c.chain_id for c in chains}
    assert all(c.signed_through_seq == c.last_seq >= 0 for c in chains)

    codec = default_codec()
    ups = [codec.decode(r.value)[1] for r in read_records(kafka.bootstrap, ["marl.policy.update"], prefix=topics)]
    assert [u["event_hash"] for u in ups] == res.update_hashes
    assert all(u["algorithm"] == "qmix" and u["verified"] and u["policy_updated"] for u in ups)
    assert ups[-1]["weights_sha256"] == res.learner.weights_sha256()
    # the buffer (5000 episodes) still holds every batch: update k names batches 1..k of each chain,
    # from the first batch's first event to the k-th batch's last, whose hash is its head
    acts = {(r.partition, r.offset): r.value
            for r in read_records(kafka.bootstrap, ["marl.joint.action"], prefix=topics)}
    for k, u in enumerate(ups, start=1):
        x = next(r for r in u["lineage"] if r["chain_id"] == "qmix1:actions")
        assert (x["first_seq"], x["last_seq"]) == (0, 32 * k - 1)
        assert x["first_offset"] == min(o for _, o in acts) and acts[(x["partition"], x["last_offset"])][-32:] == \
            x["head_event_hash"]
        assert set(u["source_event_hashes"]) == {r["head_event_hash"] for r in u["lineage"]}
