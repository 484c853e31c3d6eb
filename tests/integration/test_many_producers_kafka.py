"""Many producers, one learner (seed 002) on the real broker: three producer processes and a learner
(this process, through a consumer group) train MAPPO on simple_spread_v3 for a few rounds; every
update names every producer's ranges, the union's env steps are counted, everything verifies with
signatures required, and retraining from the topics gives the same weights, bit for bit; and a lagged
session (the producers collect round r + 1 while the learner updates on round r) does the same."""
from __future__ import annotations

import pytest
import torch
from confluent_kafka import Consumer, TopicPartition

from eventlog.audit import verify_kafka
from eventlog.checkpoint import Signer
from eventlog.codec import default_codec
from eventlog.kafka import read_records
from learners.distributed import acting_policy, read_group_run, reproduce, retrain
from learners.mappo import MAPPOConfig
from learners.replay import VERIFY_TOPICS
from marlgrc.scaleout import train_scaleout

pytestmark = pytest.mark.integration

PRODUCERS, ROUNDS, EPISODES, STEPS = 3, 3, 6, 25


@pytest.mark.timeout(240)
def test_three_producer_processes_feed_one_learner_through_kafka(kafka, topics, tmp_path):
    torch.set_num_threads(1)
    key = tmp_path / "signing.pem"
    signer = Signer.load_or_create(key)
    res = train_scaleout("simple_spread_v3", producers=PRODUCERS, bootstrap=kafka.bootstrap, prefix=topics,
                         algo="mappo", signing_key=key, iterations=ROUNDS, seed=1, run_id="many1",
                         config=MAPPOConfig(seed=1, episodes_per_update=EPISODES), board_dir=tmp_path / "policies")
    runs = [f"many1.p{k}" for k in range(PRODUCERS)]
    per_round = EPISODES * STEPS
    assert [r["env_steps"] for r in res.curve] == [per_round * (i + 1) for i in range(ROUNDS)]

    records = list(read_records(kafka.bootstrap, VERIFY_TOPICS, prefix=topics))
    group = read_group_run(records, "many1")
    assert group.runs == runs and [u["event_hash"] for u in group.updates] == res.update_hashes
    for i, u in enumerate(group.updates):
        assert u["policy_updated"] and u["verified"] and u["env_steps"] == per_round
        named = {(x["topic"], x["chain_id"]) for x in u["lineage"]}
        for run in runs:  # every producer's data chains, in every update
            assert {("marl.joint.action", f"{run}:actions"), ("marl.env.state", f"{run}:env"),
                    ("marl.agent.observation", f"{run}:obs:agent_0"),
                    ("marl.run.lifecycle", f"{run}:lifecycle")} <= named
        # each producer's share of the round: 2 episodes of 25 steps, continuing its chain
        acts = {x["chain_id"]: x for x in u["lineage"] if x["topic"] == "marl.joint.action"}
        assert [(acts[f"{run}:actions"]["first_seq"], acts[f"{run}:actions"]["last_seq"]) for run in runs] == \
            [(i * 50, i * 50 + 49)] * PRODUCERS
    # the lineage points at the real records: each range's head hash is the record at its last offset
    by_offset = {(r.topic, r.partition, r.offset): r.value for r in records}
    for x in group.updates[-1]["lineage"]:
        assert by_offset[(x["topic"], x["partition"], x["last_offset"])][-32:] == x["head_event_hash"]

    # every chain of the learner's run and of each producer's run verifies, with signatures required
    report, _ = verify_kafka(kafka.bootstrap, prefix=topics, public_key=signer.public_key, require_signed=True)
    assert report.ok, [b.describe() for b in report.breaks]
    chains = {c.chain_id for c in report.chains}
    assert {f"{run}:actions" for run in runs} | {"many1:policy:mappo", "many1:lifecycle"} <= chains
    codec = default_codec()
    finished = [codec.decode(r.value)[1] for r in records if r.key == "many1:lifecycle"]
    assert [f["event_type"] for f in finished] == ["run.started", "run.finished"]
    assert finished[1]["steps"] == per_round * ROUNDS and finished[1]["status"] == "completed"

    # retraining from the topics alone gives every update's weights again, bit for bit
    assert reproduce(records, "many1", public_key=signer.public_key) == \
        [(u["policy_version"], True) for u in group.updates]
    assert bytes(group.updates[-1]["weights_sha256"]) == res.learner.weights_sha256()

    # the learner read through its consumer group and committed its progress
    c = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": "marlgrc-learner-many1"})
    try:
        tps = [TopicPartition(topics + "marl.joint.action", p) for p in range(3)]
        committed = {tp.partition: tp.offset for tp in c.committed(tps, timeout=10)}
    finally:
        c.close()
    actions = [r for r in records if r.topic == "marl.joint.action"]
    for p, off in committed.items():
        ends = [r.offset + 1 for r in actions if r.partition == p]
        if ends:
            assert off == max(ends)


@pytest.mark.timeout(240)
def test_a_lagged_session_through_kafka_verifies_and_reproduces(kafka, topics, tmp_path):
    torch.set_num_threads(1)
    key = tmp_path / "signing.pem"
    signer = Signer.load_or_create(key)
    rounds = ROUNDS + 1
    res = train_scaleout("simple_spread_v3", producers=PRODUCERS, bootstrap=kafka.bootstrap, prefix=topics,
                         algo="mappo", signing_key=key, iterations=rounds, seed=1, run_id="lag1", lag=1,
                         config=MAPPOConfig(seed=1, episodes_per_update=EPISODES), board_dir=tmp_path / "policies")
    per_round = EPISODES * STEPS
    assert [r["env_steps"] for r in res.curve] == [per_round * (i + 1) for i in range(rounds)]
    records = list(read_records(kafka.bootstrap, VERIFY_TOPICS, prefix=topics))
    group = read_group_run(records, "lag1")
    assert group.lag == 1 and [u["event_hash"] for u in group.updates] == res.update_hashes
    for i, u in enumerate(group.updates):  # each update names exactly its round's share of every producer
        acts = {x["chain_id"]: x for x in u["lineage"] if x["topic"] == "marl.joint.action"}
        assert [(acts[f"lag1.p{k}:actions"]["first_seq"], acts[f"lag1.p{k}:actions"]["last_seq"])
                for k in range(PRODUCERS)] == [(i * 50, i * 50 + 49)] * PRODUCERS
    # round r was acted by policy max(0, r - 1), as every producer's joint.action events say
    codec = default_codec()
    versions = [group.updates[0]["parent_policy_version"]] + [u["policy_version"] for u in group.updates]
    acted: dict[int, set] = {}
    for r in records:
        if r.topic == "marl.joint.action" and r.key.startswith("lag1.p"):
            ev = codec.decode(r.value)[1]
            acted.setdefault(int(ev["producer_id"].split("-")[1]), set()).add(ev["policy_version"])
    assert acted == {r: {versions[acting_policy(r, 1)]} for r in range(rounds)}

    report, _ = verify_kafka(kafka.bootstrap, prefix=topics, public_key=signer.public_key, require_signed=True)
    assert report.ok, [b.describe() for b in report.breaks]
    assert reproduce(records, "lag1", public_key=signer.public_key) == \
        [(u["policy_version"], True) for u in group.updates]
    assert bytes(group.updates[-1]["weights_sha256"]) == res.learner.weights_sha256()
    group.lag = 0  # the lag is what makes them reproduce: without it the rounds after the first differ
    _, sync = retrain(records, group, public_key=signer.public_key)
    assert [bytes(u["weights_sha256"]) == h for u, h in zip(group.updates, sync)] == [True] + [False] * (rounds - 1)


@pytest.mark.timeout(240)
def test_train_online_with_producers_evaluates_the_trained_policy(kafka, topics, tmp_path):
    """`marlgrc train-online --producers 2 --eval-episodes N`: after the session, random and the learned
    policy (sampled, greedy) are evaluated as in one process, and the greedy figure is that of the
    signed checkpoint's weights; `marlgrc reproduce --run G` then retrains every update."""
    import json

    from typer.testing import CliRunner

    from learners.checkpoint import learner_from_checkpoint
    from learners.evaluate import GreedyPolicy, evaluate_security
    from marlgrc.cli import app
    from producers.envs import make_env

    home, out, base = tmp_path / "home", tmp_path / "curve.json", tmp_path / "ck" / "policy"
    r = CliRunner().invoke(app, ["train-online", "--env", "simple_spread_v3", "--algo", "mappo", "--producers", "2",
                                 "--iterations", "2", "--set", "episodes_per_update=4", "--eval-episodes", "5",
                                 "--out", str(out), "--checkpoint", str(base), "--home", str(home),
                                 "--bootstrap", kafka.bootstrap, "--prefix", topics])
    assert r.exit_code == 0, r.output
    assert "-> trained" in r.output and "learned (greedy)" in r.output
    doc = json.loads(out.read_text())
    assert doc["producers"] == 2 and len(doc["curve"]) == 2
    assert set(doc["policies"]) == {"random", "learned (sampled)", "learned (greedy)"}
    assert doc["random_return"] == doc["policies"]["random"]["mean_return"] < 0
    assert doc["final_eval_return"] < 0
    learner = learner_from_checkpoint(base, Signer.load(home / "keys" / "signing.pem").public_key)
    env = make_env("simple_spread_v3")[0]
    assert doc["policies"]["learned (greedy)"]["mean_return"] == \
        evaluate_security(env, GreedyPolicy(learner), 5, seed=10_000)["mean_return"]
    # and `marlgrc reproduce` retrains the group's updates from the producers' topics
    run = r.stdout.strip().splitlines()[-1]
    r = CliRunner().invoke(app, ["reproduce", "--run", run, "--no-progress", "--home", str(home),
                                 "--bootstrap", kafka.bootstrap, "--prefix", topics])
    assert r.exit_code == 0, r.output
    assert f"run {run} (group, mappo): 2 update(s) retrained" in r.output and r.output.count(": equal") == 2
