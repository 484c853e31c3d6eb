"""The event backbone on a real broker: write, replay, verify, tamper, export/import, dead letters."""
import threading
import time
import uuid

import pytest

from eventlog.audit import prove_inclusion, records_for_proof, verify_bundle, verify_kafka
from eventlog.bundle import read_bundle, write_bundle
from eventlog.checkpoint import Signer, public_key_pem
from eventlog.codec import default_codec
from eventlog.consume import decode_or_dead_letter
from eventlog.kafka import EventProducer, ensure_topics, read_records
from eventlog.log import EventLog
from tests import corruptions
from tests.synthetic import synthetic_run

pytestmark = pytest.mark.integration
SIGNER = Signer.from_seed(b"integration")
ALL = ["marl.audit.checkpoints", "marl.run.lifecycle", "marl.env.state", "marl.agent.observation",
       "marl.joint.action"]


def write_run(bootstrap, prefix, run="r1", episodes=2, steps=20, checkpoint_every=16):
    producer = EventProducer(bootstrap, prefix=prefix)
    log = EventLog(producer, run_id=run, producer_id="p", signer=SIGNER, checkpoint_every=checkpoint_every)
    synthetic_run(log, episodes=episodes, steps=steps, agents=2)
    log.close()
    return list(read_records(bootstrap, ALL, prefix=prefix))


def test_written_run_replays_and_verifies(kafka, topics):
    records = write_run(kafka.bootstrap, topics)
    report, _ = verify_kafka(kafka.bootstrap, prefix=topics, public_key=SIGNER.public_key)
    assert report.ok, [b.describe() for b in report.breaks]
    assert report.events == len(records)  # checkpoint chains are verified as chains too
    actions = [r for r in records if r.topic == "marl.joint.action"]
    assert len(actions) == 40 and len({r.partition for r in actions}) == 1  # one chain, one partition
    # replay from offsets: the second half of the actions partition only
    p = actions[0].partition
    tail = list(read_records(kafka.bootstrap, ["marl.joint.action"], prefix=topics, start_offsets={("marl.joint.action", p): 30}))
    assert [r.offset for r in tail if r.partition == p] == list(range(30, 40))
    # replay from a timestamp later than everything: nothing
    later = list(read_records(kafka.bootstrap, ["marl.joint.action"], prefix=topics,
                              start_timestamp_ms=int(time.time() * 1000) + 60_000))
    assert later == []
    # from a timestamp before everything: all
    assert len(list(read_records(kafka.bootstrap, ["marl.joint.action"], prefix=topics, start_timestamp_ms=0))) == 40


def test_close_delivers_everything_then_releases_the_client(kafka, topics):
    """close() without a flush first: every queued event is on the topic; a second close is a no-op; a
    send after it is refused (the client is gone, not merely idle until collected)."""
    producer = EventProducer(kafka.bootstrap, prefix=topics)
    log = EventLog(producer, run_id="r1", producer_id="p")
    synthetic_run(log, episodes=1, steps=7, agents=1)
    queued = producer.sent
    producer.close()
    producer.close()
    assert len(list(read_records(kafka.bootstrap, ALL, prefix=topics))) == queued > 0
    with pytest.raises(RuntimeError, match="closed"):
        producer.send("marl.joint.action", "r1:actions", b"late")


TAMPER = corruptions.standard_cases()


@pytest.fixture(scope="module")
def clean_records(kafka):
    prefix = f"t{uuid.uuid4().hex[:10]}."
    ensure_topics(kafka.bootstrap, prefix)
    return write_run(kafka.bootstrap, prefix)


@pytest.mark.parametrize("name", sorted(TAMPER))
def test_tampered_topic_is_caught_with_kind_and_location(kafka, topics, clean_records, name):
    records, kind, marker = TAMPER[name](clean_records)
    producer = EventProducer(kafka.bootstrap, prefix=topics)
    for r in records:  # the tampered history, as a topic holding it would be laid out
        producer.send(r.topic, r.key, r.value, partition=r.partition)
    producer.flush()
    report, _ = verify_kafka(kafka.bootstrap, prefix=topics, public_key=SIGNER.public_key)
    assert [b.kind for b in report.breaks] == [kind], [b.describe() for b in report.breaks]
    brk = report.breaks[0]
    assert (brk.topic, brk.chain_id, brk.partition, brk.offset) == (marker.topic, marker.key, marker.partition, marker.offset)


@pytest.mark.parametrize("name", sorted(TAMPER))
def test_tampered_bundle_is_caught(tmp_path, clean_records, name):
    records, kind, marker = TAMPER[name](clean_records)
    write_bundle(tmp_path / "b", records, public_key_pem=public_key_pem(SIGNER.public_key))
    report, _ = verify_bundle(tmp_path / "b", public_key=SIGNER.public_key)
    assert [b.kind for b in report.breaks] == [kind]
    assert (report.breaks[0].partition, report.breaks[0].offset) == (marker.partition, marker.offset)


def test_export_import_round_trip_keeps_every_byte(kafka, topics, clean_records, tmp_path):
    write_bundle(tmp_path / "b", clean_records, public_key_pem=public_key_pem(SIGNER.public_key))
    report, _ = verify_bundle(tmp_path / "b", public_key=SIGNER.public_key)
    assert report.ok and report.events == len(clean_records)
    producer = EventProducer(kafka.bootstrap, prefix=topics)
    for r in read_bundle(tmp_path / "b"):
        producer.send(r.topic, r.key, r.value)
    producer.flush()
    back = list(read_records(kafka.bootstrap, ALL, prefix=topics))
    assert sorted(r.value for r in back) == sorted(r.value for r in clean_records)
    assert verify_kafka(kafka.bootstrap, prefix=topics, public_key=SIGNER.public_key)[0].ok


def test_inclusion_proof_from_kafka(kafka, topics):
    write_run(kafka.bootstrap, topics)
    proof = prove_inclusion(records_for_proof(kafka.bootstrap, None, "marl.joint.action", "r1:actions", topics),
                            "marl.joint.action", "r1:actions", 20, SIGNER.public_key)
    assert proof.first_seq == 16 and proof.leaf_index == 4 and proof.tree_size == 16
    assert len(proof.path) == 4


def test_bad_input_goes_to_the_dead_letter_topic(kafka, topics):
    producer = EventProducer(kafka.bootstrap, prefix=topics)
    log = EventLog(producer, run_id="r1", producer_id="p")
    synthetic_run(log, episodes=1, steps=5, agents=1)
    producer.flush()
    good = log.heads()[("marl.joint.action", "r1:actions")]
    event = next(r for r in read_records(kafka.bootstrap, ["marl.joint.action"], prefix=topics))
    bad = {
        "not_single_object": b'{"step": 1}',
        "unknown_fingerprint": b"\xc3\x01" + b"\x07" * 8 + event.value[10:],
        "truncated": event.value[:70],
        "hash_mismatch": event.value[:-1] + bytes([event.value[-1] ^ 1]),
    }
    for v in bad.values():
        producer.send("marl.joint.action", "r1:actions", v)
    producer.flush()
    dlq = EventLog(EventProducer(kafka.bootstrap, prefix=topics), run_id="r1", producer_id="reader")
    decoded = list(decode_or_dead_letter(read_records(kafka.bootstrap, ["marl.joint.action"], prefix=topics),
                                         dlq, consumer="backbone-test"))
    dlq.close()
    assert [rec["seq"] for _, _, rec in decoded] == list(range(good.seq + 1))  # every good event came through
    letters = [default_codec().decode(r.value)[1] for r in read_records(kafka.bootstrap, ["marl.dlq"], prefix=topics)]
    assert sorted(d["error_kind"] for d in letters) in (sorted(bad), sorted(["not_single_object", "unknown_fingerprint", "malformed", "hash_mismatch"]))
    by_payload = {d["payload"]: d for d in letters}
    for kind, v in bad.items():
        assert v in by_payload and by_payload[v]["reason"]  # the original bytes are kept with a reason
        assert by_payload[v]["source_topic"] == "marl.joint.action"


@pytest.mark.slow
def test_broker_restart_mid_stream_leaves_no_gap_and_no_duplicate(kafka, topics):
    if kafka.home is None:
        pytest.fail("needs a launcher-started broker to restart")
    n_chains, per_chain = 20, 5000  # 100,000 events
    producer = EventProducer(kafka.bootstrap, prefix=topics, client_id="restart-test")
    log = EventLog(producer, run_id="big", producer_id="p", signer=SIGNER, checkpoint_every=2000)
    restarted = threading.Event()
    sent_when = {}

    def restart_later():
        while producer.sent < 30_000:
            time.sleep(0.01)
        sent_when["stop"] = producer.sent
        kafka.restart()
        sent_when["up"] = producer.sent
        restarted.set()

    t = threading.Thread(target=restart_later)
    t.start()
    payload = {"episode": 0, "step": 0, "actions": [{"agent_id": "a", "discrete": 1, "continuous": [], "log_prob": 0.0,
                                                     "reward": 0.5, "terminated": False, "truncated": False}],
               "joint_vector": [1.0]}
    for i in range(per_chain):
        payload["step"] = i
        for c in range(n_chains):
            log.append(f"big:c{c}", "joint.action", payload)
    t.join(timeout=120)
    log.close()
    assert restarted.is_set()
    assert sent_when["stop"] < n_chains * per_chain  # the broker went down while events were still being written
    report, _ = verify_kafka(kafka.bootstrap, prefix=topics, run_id="big", topics=["marl.joint.action"],
                             public_key=SIGNER.public_key)
    assert report.ok, [b.describe() for b in report.breaks]
    chains = [c for c in report.chains if c.topic == "marl.joint.action"]
    assert len(chains) == n_chains
    assert all(c.events == per_chain and c.last_seq == per_chain - 1 for c in chains)
    assert all(c.signed_through_seq == per_chain - 1 for c in chains)
