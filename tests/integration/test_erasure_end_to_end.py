"""Erasure across the parts, through the real CLI: producers' key shredding, the ledger's rows and
tombstone, the compliance event, and verification of topics and ledger afterwards."""
import pytest
from typer.testing import CliRunner

from eventlog.codec import default_codec
from eventlog.kafka import read_records
from ledger import SqliteLedger
from ledger.keys import KeyFile
from marlgrc.cli import app
from tests.integration.test_producers_kafka import raw_ids

pytestmark = pytest.mark.integration


def test_forget_erases_keys_ledger_rows_and_everything_still_verifies(kafka, topics, tmp_path):
    runner = CliRunner()
    common = ["--bootstrap", kafka.bootstrap, "--prefix", topics, "--home", str(tmp_path)]
    res = runner.invoke(app, ["run", "--env", "mailbox_v0", "--policy", "heuristic", "--episodes", "2", "--seed", "5",
                              "--no-progress", *common])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["ledger", "sync", *common])
    assert res.exit_code == 0, res.output
    ids, users = raw_ids(5, 2)
    user = users[0]

    ledger_path = tmp_path / "ledger" / "ledger.db"
    key = KeyFile(tmp_path / "keys" / "ledger.key")
    store = SqliteLedger(ledger_path, key)
    before = store.table_counts()
    store.close()

    res = runner.invoke(app, ["forget", "--subject", user, "--namespace", "user", "--request-id", "req-7",
                              "--legal-basis", "GDPR Art. 17(1)(a)", "--requester", "dpo", *common])
    assert res.exit_code == 0, res.output
    assert user not in res.output

    store = SqliteLedger(ledger_path, key)
    after = store.table_counts()
    tombstones = store.tombstones()
    store.close()
    erased = sum(before[t] - after[t] for t in ("environment_states", "agent_observations"))
    assert erased > 0  # the subject's rows are gone ...
    assert any(t["request_id"] == "req-7" and t["kind"] == "erasure" for t in tombstones)  # ... with a tombstone saying why

    deletion = [default_codec().decode(r.value)[1] for r in read_records(kafka.bootstrap, ["marl.compliance.deletions"],
                                                                          prefix=topics)]
    assert len(deletion) == 1
    counts = {a["target"]: a["count"] for a in deletion[0]["actions"]}
    assert counts["keystore.subject_keys"] == 1
    assert sum(n for t, n in counts.items() if t.startswith("ledger.")) == erased

    # no raw identifier anywhere: the ledger file and its WAL, and every Kafka message
    for path in ledger_path.parent.iterdir():
        data = path.read_bytes()
        assert not [i for i in ids if i.encode() in data], path
    everything = b"".join(r.value for r in read_records(
        kafka.bootstrap, ["marl.env.state", "marl.agent.observation", "marl.joint.action", "marl.run.lifecycle",
                          "marl.compliance.deletions"], prefix=topics))
    assert not [i for i in ids if i.encode() in everything]

    # the topics still verify; the ledger verifies with the erased rows bridged by its evidence
    res = runner.invoke(app, ["verify", *common])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["verify", "--ledger", "--home", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "ledger verifies" in res.output


def test_forget_validates_first_erases_every_ledger_and_a_rerun_completes_the_request(
        kafka, topics, postgres, tmp_path, monkeypatch):
    """Issue 14 items 5 and 6: a missing requester changes nothing; with --ledger-postgres the
    SQLCipher ledger is erased too; a re-run of the same request says what was already done."""
    import uuid

    from eventlog.privacy import LocalKeyStore
    from ledger.postgres import PostgresLedger, install

    runner = CliRunner()
    common = ["--bootstrap", kafka.bootstrap, "--prefix", topics, "--home", str(tmp_path)]
    assert runner.invoke(app, ["run", "--env", "mailbox_v0", "--policy", "heuristic", "--episodes", "1", "--seed", "6",
                               "--no-progress", *common]).exit_code == 0
    assert runner.invoke(app, ["ledger", "sync", *common]).exit_code == 0
    schema = f"erase_{uuid.uuid4().hex[:8]}"
    install(postgres.dsn, schema)
    res = runner.invoke(app, ["ledger", "sync", "--postgres", postgres.dsn, "--schema", schema, *common])
    assert res.exit_code == 0, res.output
    _, users = raw_ids(6, 1)
    user = users[0]
    forget = ["forget", "--subject", user, "--namespace", "user", "--request-id", "req-8",
              "--legal-basis", "GDPR Art. 17(1)(a)", *common]

    monkeypatch.delenv("USER", raising=False)
    res = runner.invoke(app, forget)
    assert res.exit_code == 2 and "--requester" in res.output and "nothing was changed" in res.output
    with LocalKeyStore(tmp_path / "keys" / "subjects.db") as keys:  # the key is still there
        assert keys.subject_key("user", user, create=False) is not None

    res = runner.invoke(app, [*forget, "--requester", "dpo", "--ledger-postgres", postgres.dsn])  # no such schema
    assert res.exit_code == 2 and "no ledger in schema 'ledger'" in res.output
    with LocalKeyStore(tmp_path / "keys" / "subjects.db") as keys:  # checked before anything changed
        assert keys.subject_key("user", user, create=False) is not None and keys.erasure_request("req-8") is None

    forget += ["--requester", "dpo", "--ledger-postgres", postgres.dsn, "--schema", schema]
    res = runner.invoke(app, forget)
    assert res.exit_code == 0, res.output
    store = SqliteLedger(tmp_path / "ledger" / "ledger.db", KeyFile(tmp_path / "keys" / "ledger.key"))
    pg = PostgresLedger(postgres.dsn, schema)
    for ledger in (store, pg):  # both ledgers hold the tombstone
        assert [t["request_id"] for t in ledger.tombstones() if t["kind"] == "erasure"] == ["req-8"]
    store.close()
    pg.close()
    assert "ledger.postgres." in res.output and "ledger." in res.output

    res = runner.invoke(app, forget)
    assert res.exit_code == 0, res.output
    assert "resumed request req-8: already done:" in res.output and "kafka.compliance_deletion" in res.output
    deletions = read_records(kafka.bootstrap, ["marl.compliance.deletions"], prefix=topics)
    assert len(list(deletions)) == 1  # nothing was published twice
