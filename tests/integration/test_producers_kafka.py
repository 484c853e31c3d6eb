"""Producers on the real broker: MPE2 simple_spread through the harness; mailbox_v0 through
`marlgrc run`, a leak scan of everything produced, and `marlgrc forget` end to end."""
import logging

import pytest
import typer
from mpe2 import simple_spread_v3
from typer.testing import CliRunner

from eventlog.checkpoint import Signer
from eventlog.codec import default_codec
from eventlog.kafka import EventProducer, read_records
from eventlog.log import EventLog
from eventlog.privacy import FieldProtector, KeyShredded, LocalKeyStore, PrivacyError
from eventlog.verify import verify_records
from marlgrc.commands_producers import register
from marlgrc.config import Settings
from producers.envs import mailbox_v0
from producers.harness import run_episodes
from producers.policies import RandomPolicy
from producers.spaces import space_record
from schemas import TOPICS

pytestmark = pytest.mark.integration


def all_records(bootstrap, prefix):
    return list(read_records(bootstrap, TOPICS, prefix=prefix))


def test_simple_spread_stream_verifies_and_describes_spaces(kafka, topics):
    env = simple_spread_v3.parallel_env(N=3, max_cycles=25, local_ratio=0.5)
    signer = Signer.generate()
    log = EventLog(EventProducer(kafka.bootstrap, prefix=topics), run_id="spread1", producer_id="h", signer=signer,
                   checkpoint_every=20)
    summary = run_episodes(env, RandomPolicy(env, seed=0), log, episodes=2, seed=0, env_id="simple_spread_v3",
                           env_version="3", config={"N": 3, "max_cycles": 25, "local_ratio": 0.5})
    log.close()
    records = all_records(kafka.bootstrap, topics)
    report = verify_records(records, signer.public_key)
    assert report.ok, [b.describe() for b in report.breaks]
    data = [r for r in records if r.topic != "marl.audit.checkpoints"]
    assert len(data) == summary.events == 2 + 50 * 5 + 2  # + an episode.summary per episode
    codec = default_codec()
    started = next(codec.decode(r.value)[1] for r in records if r.topic == "marl.run.lifecycle"
                   and codec.decode(r.value)[1]["event_type"] == "run.started")
    assert [a["agent_id"] for a in started["agents"]] == env.possible_agents
    for spec in started["agents"]:
        assert spec["observation_space"] == space_record(env.observation_space(spec["agent_id"]))
        assert spec["action_space"] == space_record(env.action_space(spec["agent_id"]))
        assert spec["observation_space"]["shape"] == [18] and spec["action_space"]["n"] == 5
    assert started["state_space"] == space_record(env.state_space) and started["state_space"]["shape"] == [54]
    actions = verify_records([r for r in records if r.topic == "marl.joint.action"]).chains
    assert [c.events for c in actions] == [50]


def raw_ids(seed, episodes, inbox_size=20):
    env = mailbox_v0.parallel_env(inbox_size=inbox_size)
    ids, users = set(), []
    for ep in range(episodes):
        env.reset(seed=seed + ep)
        ids |= env.raw_identifiers()
        users += [env._users[u] for u in env._items["user"]]
    return ids, users


def test_mailbox_run_leaks_nothing_and_forget_erases(kafka, topics, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    common = ["--bootstrap", kafka.bootstrap, "--prefix", topics, "--home", str(tmp_path)]
    res = runner.invoke(app, ["run", "--env", "mailbox_v0", "--policy", "heuristic", "--episodes", "2",
                              "--seed", "11", "--no-progress", *common])
    assert res.exit_code == 0, res.output
    run_id = res.stdout.strip().splitlines()[-1]
    assert run_id.startswith("mailbox_v0__heuristic__11__")
    ids, users = raw_ids(11, 2)
    assert len(ids) > 40

    records = all_records(kafka.bootstrap, topics)
    assert len(records) > 2 * 20 * 5
    produced = b"".join(r.key.encode() + r.value for r in records)
    texts = res.output + caplog.text
    leaks = [i for i in ids if i.encode() in produced or i in texts]
    assert leaks == []

    # pick the recipient of episode 0's first item; find its events through the key store
    user = users[0]
    with LocalKeyStore(Settings.load(home=tmp_path).keystore) as keys:
        prot = FieldProtector(keys)
        codec = default_codec()
        protected = [(r.key, rec["seq"], f) for r in records if r.topic in ("marl.env.state", "marl.agent.observation")
                     for rec in [codec.decode(r.value)[1]] for f in rec["protected_fields"]]
        ref = prot.subject_ref("user", user)
        mine = [p for p in protected if p[2]["subject_ref"] == ref]
        assert mine and prot.reveal(*mine[0]) in (user.encode(), *[i.encode() for i in ids])
        others = [p for p in protected if p[2]["namespace"] == "sender"]

    res = runner.invoke(app, ["forget", "--subject", user, "--namespace", "user", "--request-id", "req-1",
                              "--legal-basis", "GDPR Art. 17(1)(a)", "--requester", "dpo@example.org", *common])
    assert res.exit_code == 0, res.output
    assert user not in res.output and ref.hex() in res.output

    after = all_records(kafka.bootstrap, topics)
    deletions = [codec.decode(r.value)[1] for r in after if r.topic == "marl.compliance.deletions"]
    assert len(deletions) == 1
    d = deletions[0]
    assert (d["subject_ref"], d["namespace"], d["request_id"], d["legal_basis"]) == (ref, "user", "req-1",
                                                                                   "GDPR Art. 17(1)(a)")
    assert {a["target"]: a["count"] for a in d["actions"]} == {"keystore.subject_keys": 1, "keystore.blind_index": 1}
    assert user.encode() not in b"".join(r.value for r in after)

    with LocalKeyStore(Settings.load(home=tmp_path).keystore) as keys:
        prot = FieldProtector(keys)
        for p in mine:
            with pytest.raises(KeyShredded) as err:
                prot.reveal(*p)
            assert not [i for i in ids if i in str(err.value)]
        assert keys.subject_key("user", user, create=False) is None
        assert prot.reveal(*others[0]) in {i.encode() for i in ids}   # other subjects unaffected
        with pytest.raises(PrivacyError) as err:                       # wrong event: clean message, no raw id
            prot.reveal(others[0][0], others[0][1] + 1, others[0][2])
        assert not [i for i in ids if i in str(err.value)]

    from cryptography.hazmat.primitives import serialization
    from eventlog.checkpoint import load_public_key
    signer = Signer.load(tmp_path / "keys" / "signing.pem")
    report = verify_records(after, load_public_key(signer.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)))
    assert report.ok, [b.describe() for b in report.breaks]
    assert report.events == len(after)

    # a second request for the same subject deletes nothing and says so, without the raw id
    res = runner.invoke(app, ["forget", "--subject", user, "--namespace", "user", "--request-id", "req-2",
                              "--legal-basis", "x", "--requester", "dpo", *common])
    assert res.exit_code == 2 and "no key for this subject" in res.output and "nothing was changed" in res.output
    assert user not in res.output


def test_run_errors_are_one_line(kafka, tmp_path):
    app = typer.Typer()
    register(app)
    res = CliRunner().invoke(app, ["run", "--env", "no_such_module:thing", "--home", str(tmp_path),
                                   "--bootstrap", kafka.bootstrap])
    assert res.exit_code == 2 and "cannot import no_such_module" in res.output  # bad input: could not run
    res = CliRunner().invoke(app, ["run", "--env", "mpe2.simple_spread_v3:parallel_env", "--policy", "heuristic",
                                   "--home", str(tmp_path), "--bootstrap", kafka.bootstrap])
    assert res.exit_code == 2 and "heuristic_action" in res.output


def test_cli_runs_any_installed_parallel_env(kafka, topics, tmp_path):
    app = typer.Typer()
    register(app)
    res = CliRunner().invoke(app, ["run", "--env", "mpe2.simple_spread_v3:parallel_env", "--env-arg", "N=3",
                                   "--env-arg", "max_cycles=5", "--episodes", "2", "--seed", "4",
                                   "--bootstrap", kafka.bootstrap, "--prefix", topics, "--home", str(tmp_path)])
    assert res.exit_code == 0, res.output
    run_id = res.stdout.strip().splitlines()[-1]
    assert run_id.startswith("simple_spread_v3__random__4__")
    records = all_records(kafka.bootstrap, topics)
    assert {r.key for r in records if r.topic == "marl.joint.action"} == {f"{run_id}:actions"}
    assert sum(r.topic == "marl.joint.action" for r in records) == 10
    codec = default_codec()
    started = codec.decode(next(r.value for r in records if r.topic == "marl.run.lifecycle"))[1]
    assert started["env_id"] == "simple_spread_v3" and started["env_version"] == "3" and started["seed"] == 4
    assert verify_records(records, Signer.load(tmp_path / "keys" / "signing.pem").public_key).ok


@pytest.mark.parametrize("env", ["market_v0", "retail_v0", "banking_v0"])
def test_seed_envs_run_through_kafka_verify_signed_and_sync_to_the_ledger(kafka, topics, tmp_path, env):
    """Issue 15: the seed systems' environments go through the audited pipeline like mailbox_v0."""
    from marlgrc.cli import app as cli

    common = ["--bootstrap", kafka.bootstrap, "--prefix", topics, "--home", str(tmp_path)]
    res = CliRunner().invoke(cli, ["run", "--env", env, "--policy", "heuristic", "--episodes", "2", "--seed", "3",
                                   "--no-progress", *common])
    assert res.exit_code == 0, res.output
    run_id = res.stdout.strip().splitlines()[-1]
    assert run_id.startswith(f"{env}__heuristic__3__")
    res = CliRunner().invoke(cli, ["verify", "--run", run_id, "--require-signed", *common])
    assert res.exit_code == 0 and "no break" in res.output, res.output
    res = CliRunner().invoke(cli, ["ledger", "sync", *common])
    assert res.exit_code == 0, res.output
    from ledger import SqliteLedger
    from ledger.keys import KeyFile

    store = SqliteLedger(tmp_path / "ledger" / "ledger.db", KeyFile(tmp_path / "keys" / "ledger.key"))
    try:
        counts = store.table_counts()
        lifecycle = sorted(r[0] for r in store.query("SELECT event_type FROM runs WHERE run_id = ?", (run_id,)))
    finally:
        store.close()
    assert lifecycle == ["run.finished", "run.started"] and counts["joint_actions"] > 0 and counts["environment_states"] == counts["joint_actions"]
