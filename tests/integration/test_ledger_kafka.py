"""The ledger fed from the real broker: one-shot and follow sync, a SIGKILL mid-sync then a restart,
rebuild from the topics, and the CLI (sync, purge, verify, rebuild, report)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import typer
from confluent_kafka import Producer
from typer.testing import CliRunner

from eventlog.kafka import EventProducer, read_records
from schemas import TOPICS
from ledger import Materializer, SqliteLedger, drop_sqlite, rebuild, sync, verify_ledger
from tests.unit.test_ledger_storage import KEY, SIGNER, make_run

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def produce(kafka, prefix, sent):
    p = EventProducer(kafka.bootstrap, prefix=prefix)
    for t, k, v in sent:
        p.send(t, k, v)
    p.flush()


def test_sync_one_shot_then_follow(kafka, topics, tmp_path):
    first = make_run("r1")
    produce(kafka, topics, first)
    led = SqliteLedger(tmp_path / "l.db", KEY)
    stats = sync(led, kafka.bootstrap, prefix=topics, commit_every=50)
    assert stats.records == len(first) and stats.findings == []
    assert sync(led, kafka.bootstrap, prefix=topics).records == 0      # nothing new: nothing read twice
    stop = threading.Event()
    result = {}
    follower = SqliteLedger(tmp_path / "l.db", KEY)
    th = threading.Thread(target=lambda: result.update(stats=sync(
        follower, kafka.bootstrap, prefix=topics, follow=True, poll_interval=0.2, should_stop=stop.is_set)))
    th.start()
    second = make_run("r2")
    produce(kafka, topics, second)
    deadline = time.monotonic() + 60
    while led.query("SELECT COUNT(*) FROM runs WHERE run_id = 'r2'")[0][0] < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    stop.set()
    th.join(60)
    assert result["stats"].records == len(second)
    report = verify_ledger(led, SIGNER.public_key)
    assert report.ok, report.lines()
    assert report.chains.events == len(first) + len(second)


def tampered_stream() -> list[tuple]:
    """A run, then what an attacker or a broken producer adds: replays of stored events, an edited
    copy, an event under the wrong key (alone on its chain, so no partition interleaving can reorder
    its chain), and bytes that are no event at all."""
    sent = make_run("r1", episodes=6, steps=10)
    actions = [m for m in sent if m[0] == "marl.joint.action"]
    extra = make_run("r2", episodes=1, steps=8)
    edited = bytearray(extra[3][2])
    edited[60] ^= 0x01
    stray = make_run("r3", episodes=1, steps=8)[0]
    return (sent + [actions[0], actions[1]] + extra[:3] + [(extra[3][0], extra[3][1], bytes(edited))]
            + [(stray[0], "not-the-chain", stray[2]), ("marl.joint.action", "r1:actions", b"not an event"),
               actions[2]] + extra[4:])


def test_overlapped_commits_give_what_one_batch_at_a_time_gives(kafka, topics, tmp_path):
    """sync commits each batch on a second thread while the next is read and checked; the result
    (rows, offsets, findings, duplicates across batches included, which only the store can tell)
    equals writing the same batches one complete transaction after another on one thread."""
    produce(kafka, topics, tampered_stream())
    stray = make_run("r4", episodes=1, steps=8)[0]
    raw = Producer({"bootstrap.servers": kafka.bootstrap})
    raw.produce(topics + stray[0], key=b"\xff\xfe not utf-8", value=stray[2])  # a key no chain id can be
    raw.flush(30)
    overlapped = SqliteLedger(tmp_path / "overlapped.db", KEY)
    stats = sync(overlapped, kafka.bootstrap, prefix=topics, commit_every=37)
    serial = SqliteLedger(tmp_path / "serial.db", KEY)
    m = Materializer(serial)
    records = list(read_records(kafka.bootstrap, list(TOPICS), prefix=topics))
    findings = [f for i in range(0, len(records), 37) for f in m.ingest_batch(records[i:i + 37])]
    assert stats.records == len(records) and stats.batches == -(-len(records) // 37)
    assert sorted(stats.findings, key=repr) == sorted(findings, key=repr)
    assert overlapped.content_hash() == serial.content_hash()
    kinds = {f.kind for f in findings}
    assert {"duplicated", "undecodable", "wrong_key", "edited"} <= kinds, kinds
    assert [f.chain_id for f in findings if f.kind == "wrong_key"].count("r4:lifecycle") == 1


def test_sigkill_mid_sync_then_restart_loses_and_duplicates_nothing(kafka, topics, tmp_path):
    sent = make_run("r1", episodes=40, steps=25)
    produce(kafka, topics, sent)
    clean = SqliteLedger(tmp_path / "clean.db", KEY)
    sync(clean, kafka.bootstrap, prefix=topics, commit_every=200)
    script = textwrap.dedent(f"""
        import sys
        from ledger import SqliteLedger, StaticKey, sync
        led = SqliteLedger({str(tmp_path / 'crash.db')!r}, StaticKey(bytes.fromhex({KEY.key.hex()!r})))
        def tick(stats):
            print(stats.records, flush=True)
        sync(led, {kafka.bootstrap!r}, prefix={topics!r}, commit_every=50, on_batch=tick)
        print("finished", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    seen = 0
    for line in proc.stdout:
        seen = int(line) if line.strip().isdigit() else seen
        if seen >= 1000:
            os.kill(proc.pid, signal.SIGKILL)   # mid-stream, possibly inside a transaction
            break
    proc.wait(30)
    assert 0 < seen < len(sent), "the crash must land mid-stream"
    led = SqliteLedger(tmp_path / "crash.db", KEY)
    assert 0 < sum(led.offsets().values()) < len(sent)
    stats = sync(led, kafka.bootstrap, prefix=topics, commit_every=50)
    assert stats.findings == []
    assert led.content_hash() == clean.content_hash()
    assert sum(led.table_counts()[t] for t in ("runs", "environment_states", "agent_observations", "joint_actions",
                                               "di_credit_assignment", "fairness_metrics", "policy_updates",
                                               "audit_checkpoints")) == len(sent)


def test_rebuild_from_topics_gives_the_same_contents(kafka, topics, tmp_path):
    produce(kafka, topics, make_run("r1"))
    path = tmp_path / "l.db"
    led = SqliteLedger(path, KEY)
    sync(led, kafka.bootstrap, prefix=topics, commit_every=64)
    before = led.content_hash()
    led.close()

    def open_empty():
        drop_sqlite(path)
        return SqliteLedger(path, KEY)

    new, stats = rebuild(open_empty, kafka.bootstrap, prefix=topics, commit_every=999)
    assert stats.records > 0 and new.content_hash() == before


def test_cli_sync_verify_purge_report(kafka, topics, tmp_path, monkeypatch):
    from marlgrc.commands_ledger import register

    produce(kafka, topics, make_run("r0", age_micros=400 * 86_400_000_000) + make_run("r1"))
    app = typer.Typer()
    register(app)
    monkeypatch.setenv("MARLGRC_LEDGER_KEY", KEY.key.hex())
    common = ["--home", str(tmp_path), "--ledger", str(tmp_path / "l.db")]
    runner = CliRunner()
    res = runner.invoke(app, ["ledger", "sync", *common, "--bootstrap", kafka.bootstrap, "--prefix", topics])
    assert res.exit_code == 0, res.output
    assert "0 integrity findings" in res.output and KEY.key.hex() not in res.output
    res = runner.invoke(app, ["ledger", "purge", *common])
    assert res.exit_code == 0 and "purged" in res.output, res.output
    res = runner.invoke(app, ["ledger", "verify", *common])
    assert res.exit_code == 0 and "ledger verifies" in res.output, res.output
    res = runner.invoke(app, ["report", "--run", "r1", "--out", str(tmp_path / "rep"), *common])
    assert res.exit_code == 0, res.output
    for name in ("reward_convergence.png", "credit_per_agent.png", "fairness_over_time.png"):
        assert (tmp_path / "rep" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "credit per agent: agent_0" in (tmp_path / "rep" / "summary.txt").read_text()
    res = runner.invoke(app, ["report", "--run", "nope", *common])
    assert res.exit_code == 2 and "no rows for run 'nope'" in res.output
    monkeypatch.setenv("MARLGRC_LEDGER_KEY", "00" * 32)
    res = runner.invoke(app, ["ledger", "verify", *common])
    assert res.exit_code == 2 and "does not decrypt" in res.output and "00" * 32 not in res.output
    monkeypatch.setenv("MARLGRC_LEDGER_KEY", KEY.key.hex())
    res = runner.invoke(app, ["ledger", "rebuild", "--yes", *common, "--bootstrap", kafka.bootstrap,
                              "--prefix", topics])
    # the topics still hold the purged run r0, so the rebuilt ledger differs from the purged one
    assert res.exit_code == 0 and "DIFFERENT" in res.output, res.output


def test_cli_an_event_id_stored_with_other_bytes_fails_sync_and_verify(kafka, topics, tmp_path, monkeypatch):
    """Issue 14 item 4 end to end: a forged event that reuses a stored event_id (a chain of its own,
    valid hash and link) is not dropped silently: `ledger sync` and `ledger verify` both name it and
    exit 1, and the stored row keeps its bytes."""
    from eventlog.codec import default_codec
    from marlgrc.commands_ledger import register
    from tests.unit.test_ledger_storage import _sealed

    sent = make_run("r1")
    produce(kafka, topics, sent)
    app = typer.Typer()
    register(app)
    monkeypatch.setenv("MARLGRC_LEDGER_KEY", KEY.key.hex())
    common = ["--home", str(tmp_path), "--ledger", str(tmp_path / "l.db")]
    runner = CliRunner()
    res = runner.invoke(app, ["ledger", "sync", *common, "--bootstrap", kafka.bootstrap, "--prefix", topics])
    assert res.exit_code == 0 and "0 integrity findings" in res.output, res.output
    original = next(v for t, k, v in sent if k == "r1:actions")
    _, rec = default_codec().decode(original)
    forged = _sealed(dict(rec, chain_id="r9:actions", producer_id="someone else"))
    produce(kafka, topics, [("marl.joint.action", "r9:actions", forged)])
    res = runner.invoke(app, ["ledger", "sync", *common, "--bootstrap", kafka.bootstrap, "--prefix", topics])
    assert res.exit_code == 1 and "1 integrity findings" in res.output, res.output
    assert "FINDING edited in marl.joint.action chain r9:actions" in res.output
    assert f"event_id {rec['event_id']} is already in the ledger with other bytes" in res.output
    res = runner.invoke(app, ["ledger", "verify", *common])
    assert res.exit_code == 1 and "ledger does NOT verify" in res.output, res.output
    assert "FINDING (at ingest) edited in marl.joint.action chain r9:actions" in res.output
    led = SqliteLedger(tmp_path / "l.db", KEY)
    (raw,), = led.query("SELECT raw FROM joint_actions WHERE event_id = ?", (rec["event_id"],))
    assert bytes(raw) == original
    led.close()


def test_ledger_commands_on_a_wrong_key_a_missing_file_or_no_broker_say_so_in_one_line(kafka, topics, tmp_path):
    """Issue 14 item 9, SQLCipher: every ledger command against a wrong key, a malformed key, a
    ledger file that is not there or cannot be made, an empty erasure field, or a broker that does
    not answer stops with one line and exit 2 (run as a person runs it: no traceback), and changes
    nothing; `rebuild` checks the broker before it drops anything."""
    from tests.integration.test_ledger_postgres import assert_one_line, cli

    produce(kafka, topics, make_run("r1"))
    path = tmp_path / "l.db"
    led = SqliteLedger(path, KEY)
    sync(led, kafka.bootstrap, prefix=topics)
    before = led.content_hash()
    led.close()
    key_file = tmp_path / "ledger.key"
    key_file.write_text(KEY.key.hex())
    key_file.chmod(0o600)
    wrong = tmp_path / "wrong.key"
    wrong.write_text("00" * 32)
    wrong.chmod(0o600)
    garbled = tmp_path / "garbled.key"
    garbled.write_text("zz-not-a-key")
    garbled.chmod(0o600)
    here = ["--bootstrap", kafka.bootstrap, "--prefix", topics]
    ref = ["--subject-ref", "ab" * 32, "--request-id", "r", "--requester", "dpo", "--legal-basis", "b"]
    commands = [["ledger", "sync", *here], ["ledger", "purge"], ["ledger", "erase", *ref], ["ledger", "verify"],
                ["ledger", "rebuild", "--yes", *here], ["report", "--run", "r1", "--out", str(tmp_path / "rep")]]
    (tmp_path / "a-file").write_text("")
    cases: list[tuple[list[str], tuple[str, ...]]] = []      # (arguments, what its one line names)
    for args in commands:
        cases.append(([*args, "--ledger", str(path), "--key-file", str(wrong)], ("does not decrypt", str(path))))
        if args[1] != "sync":
            cases.append(([*args, "--ledger", str(tmp_path / "none.db"), "--key-file", str(key_file)],
                          (f"no ledger at {tmp_path / 'none.db'}", "marlgrc ledger sync")))
    for args in (commands[0], commands[3]):
        cases.append(([*args, "--ledger", str(path), "--key-file", str(garbled)], ("must hold a 32-byte key",)))
    cases.append((["ledger", "sync", *here, "--ledger", str(tmp_path / "a-file" / "l.db"), "--key-file",
                   str(key_file)], ("cannot open the ledger file", "--ledger")))
    cases.append((["ledger", "erase", *ref[:-2], "--legal-basis", " ", "--ledger", str(path), "--key-file",
                   str(key_file)], ("--legal-basis", "nothing was changed")))
    rebuild_nowhere = ["ledger", "rebuild", "--yes", "--bootstrap", "127.0.0.1:1", "--prefix", topics, "--ledger",
                       str(path), "--key-file", str(key_file)]
    with ThreadPoolExecutor(4) as pool:   # processes of their own; each only fails
        nowhere = pool.submit(cli, *rebuild_nowhere, home=tmp_path)
        results = list(pool.map(lambda case: cli(*case[0], home=tmp_path), cases))
        res = nowhere.result()
    for (args, words), got in zip(cases, results):
        line = assert_one_line(got, *words)
        assert "00" * 32 not in line and KEY.key.hex() not in line, args
    # librdkafka logs its own connection failures on stderr first (eventlog's clients); ours is one line
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert len(errors) == 1 and "Kafka at 127.0.0.1:1 did not answer" in errors[0], res.stderr
    led = SqliteLedger(path, KEY)
    assert led.content_hash() == before and led.tombstones() == []      # nothing was changed, nothing dropped
    led.close()
