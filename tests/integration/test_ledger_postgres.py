"""The PostgreSQL ledger against the real server from the launcher: the shared storage contract,
then the roles (writer and analyst) proven by connecting as each."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

from ledger import Materializer, erase_subject, purge_expired, verify_ledger
from ledger.keys import KeyFile
from ledger.postgres import ANALYST, WRITER, PostgresLedger, drop, install
from tests.unit.test_ledger_storage import RECORDS, SIGNER, SUBJECT_A, LedgerStorageContract, SqliteLedger, KEY

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def schema(postgres):
    name = f"ledger_{uuid.uuid4().hex[:10]}"
    install(postgres.dsn, name)
    yield name
    drop(postgres.dsn, name)


class TestPostgresStorage(LedgerStorageContract):
    @pytest.fixture(autouse=True)
    def _pg(self, postgres):
        self.dsn = postgres.dsn
        self.schemas = []
        self.opened = []
        yield
        for led in self.opened:
            led.close()
        for s in self.schemas:
            drop(self.dsn, s)

    def new_ledger(self):
        name = f"ledger_{uuid.uuid4().hex[:10]}"
        install(self.dsn, name)
        self.schemas.append(name)
        led = PostgresLedger(self.dsn, name, user=WRITER)   # everything the materializer does, as the writer
        self.opened.append(led)
        return led

    def reopen(self, led):
        other = PostgresLedger(self.dsn, led.schema, user=WRITER)
        self.opened.append(other)
        return other

    def raw_sql(self, led, sql):
        led.conn.execute(sql)

    def delete_behind_the_back(self, led, table, chain, seq):
        # the database owner, bypassing the deletion functions
        with psycopg.connect(self.dsn, autocommit=False, options=f"-c search_path={led.schema}") as conn:
            conn.execute("SELECT set_config('marlgrc.ledger_deletion', 'on', true)")
            conn.execute(f"DELETE FROM {table} WHERE chain_id = %s AND seq = %s", (chain, seq))
            conn.commit()


def _as(dsn, schema, role):
    return psycopg.connect(dsn, user=role, autocommit=True, options=f"-c search_path={schema}")


def test_writer_inserts_but_cannot_update_or_delete(postgres, schema):
    led = PostgresLedger(postgres.dsn, schema, user=WRITER)
    Materializer(led).ingest(RECORDS, commit_every=100)
    assert led.conn.info.user == WRITER
    for stmt in ("UPDATE joint_actions SET team_reward = 1", "DELETE FROM joint_actions",
                 "DELETE FROM deletion_events", "UPDATE integrity_findings SET detail = ''",
                 "INSERT INTO deletion_events (kind, deleted_at) VALUES ('retention', 0)",
                 "SELECT ledger_delete_rows('retention', ARRAY['joint_actions'], 'true', 0, NULL, '', '', '')",
                 "SELECT set_config('marlgrc.ledger_deletion', 'on', false); DELETE FROM joint_actions"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            led.conn.execute(stmt)
    # only through the SECURITY DEFINER functions, and a purge cannot reach into the future
    with pytest.raises(psycopg.errors.RaiseException, match="in the future"):
        led.conn.execute("SELECT ledger_purge(%s)", (2 ** 62,))
    summary = erase_subject(led, SUBJECT_A, "req-9", "dpo", "GDPR Art. 17")
    assert summary.total == 2
    assert verify_ledger(led, SIGNER.public_key).ok
    led.close()


def test_analyst_reads_views_without_restricted_columns_and_cannot_write(postgres, schema):
    led = PostgresLedger(postgres.dsn, schema, user=WRITER)
    Materializer(led).ingest(RECORDS, commit_every=100)
    purge_expired(led)
    led.close()
    with _as(postgres.dsn, schema, ANALYST) as conn:
        assert conn.execute("SELECT COUNT(*) FROM v_joint_actions").fetchone()[0] == 24
        assert conn.execute("SELECT COUNT(*) FROM v_reward_convergence").fetchone()[0] == 3
        cols = {c.name for c in conn.execute("SELECT * FROM v_agent_observations LIMIT 1").description}
        assert "observation" in cols and not cols & {"raw", "subject_refs", "protected_fields"}
        cols = {c.name for c in conn.execute("SELECT * FROM v_deletion_events LIMIT 1").description}
        assert "subject_ref" not in cols and "merkle_root" in cols
        for stmt in ("SELECT raw FROM joint_actions", "SELECT subject_refs FROM agent_observations",
                     "SELECT * FROM agent_observations", "SELECT raw FROM v_joint_actions",
                     "INSERT INTO ingest_offsets VALUES ('x', 0, 0)", "DELETE FROM joint_actions",
                     "UPDATE ingest_offsets SET next_offset = 0", "SELECT ledger_purge(0)",
                     "SELECT ledger_erase_subject(%s, 'r', 'r', 'r')"):
            with pytest.raises((psycopg.errors.InsufficientPrivilege, psycopg.errors.UndefinedColumn)):
                conn.execute(stmt, (SUBJECT_A,) if "%s" in stmt else None)


def test_postgres_and_sqlcipher_hold_the_same_contents(postgres, schema, tmp_path):
    pg = PostgresLedger(postgres.dsn, schema, user=WRITER)
    Materializer(pg).ingest(RECORDS, commit_every=64)
    lite = SqliteLedger(tmp_path / "l.db", KEY)
    Materializer(lite).ingest(RECORDS, commit_every=64)
    assert pg.content_hash() == lite.content_hash()
    s1, s2 = purge_expired(pg), purge_expired(lite)
    assert s1.counts == s2.counts
    e1, e2 = erase_subject(pg, SUBJECT_A, "r", "q", "b"), erase_subject(lite, SUBJECT_A, "r", "q", "b")
    assert [(e.chain_id, e.first_seq, e.last_seq, e.merkle_root, e.prev_hash, e.head_hash) for e in e1.evidence] == \
           [(e.chain_id, e.first_seq, e.last_seq, e.merkle_root, e.prev_hash, e.head_hash) for e in e2.evidence]
    assert pg.content_hash() == lite.content_hash()
    pg.close()


# ------------------------------------------------------------------ erasure reaches every ledger (issue 14 item 6)
def test_ledgers_forget_did_not_reach_erase_the_subject_when_they_sync_and_when_rebuilt(kafka, topics, postgres,
                                                                                       tmp_path, request):
    """`forget` erases the ledgers it knows (the home's SQLCipher file, one PostgreSQL schema); a
    SQLCipher file and a schema synced only afterwards apply its compliance.deletion event: no row of
    the subject, one tombstone for the request. The ledgers forget erased add no second tombstone
    when they sync the event; `ledger rebuild` from the topics ends the same, with equal contents."""
    from marlgrc.cli import app
    from tests.integration.test_producers_kafka import raw_ids
    from tests.unit.test_ledger_storage import erased_under, subject_rows

    runner = CliRunner()
    common = ["--bootstrap", kafka.bootstrap, "--prefix", topics, "--home", str(tmp_path)]

    def ok(*args):
        res = runner.invoke(app, [*args, *common])
        assert res.exit_code == 0, (args, res.output)
        return res.output

    ok("run", "--env", "mailbox_v0", "--policy", "heuristic", "--episodes", "1", "--seed", "6", "--no-progress")
    reached, late = (f"forget_{uuid.uuid4().hex[:8]}", f"late_{uuid.uuid4().hex[:8]}")
    request.addfinalizer(lambda: (drop(postgres.dsn, reached), drop(postgres.dsn, late)))
    ok("ledger", "sync")
    ok("ledger", "sync", "--postgres", postgres.dsn, "--schema", reached)
    _, users = raw_ids(6, 1)
    out = ok("forget", "--subject", users[0], "--namespace", "user", "--request-id", "req-L", "--legal-basis",
             "GDPR Art. 17(1)(a)", "--requester", "dpo", "--ledger-postgres", postgres.dsn, "--schema", reached)
    ref = bytes.fromhex(out.split("erased subject ", 1)[1].split()[0])
    key = KeyFile(tmp_path / "keys" / "ledger.key")
    home_file, late_file = tmp_path / "ledger" / "ledger.db", tmp_path / "late.db"

    def opened():
        return [SqliteLedger(home_file, key), PostgresLedger(postgres.dsn, reached),
                SqliteLedger(late_file, key), PostgresLedger(postgres.dsn, late)]

    def check():
        for led in opened():
            try:
                assert subject_rows(led, ref) == 0, led
                assert [t["request_id"] for t in led.tombstones() if t["kind"] == "erasure"] == ["req-L"], led
                assert led.count("compliance_deletions") == 1
                assert erased_under(led, "req-L") > 0, led     # its rows were there, and went with evidence
                report = verify_ledger(led)
                assert report.ok, report.lines()
            finally:
                led.close()

    out = ok("ledger", "sync", "--ledger", str(late_file), "--batch", "7")
    assert "applied 1 compliance.deletion events (req-L)" in out
    out = ok("ledger", "sync", "--postgres", postgres.dsn, "--schema", late, "--batch", "7")
    assert "applied 1 compliance.deletion events (req-L)" in out
    ok("ledger", "sync")                                                  # forget erased these two already
    ok("ledger", "sync", "--postgres", postgres.dsn, "--schema", reached)
    check()
    ok("verify", "--ledger")

    for where in (["--ledger", str(late_file)], [], ["--postgres", postgres.dsn, "--schema", late],
                  ["--postgres", postgres.dsn, "--schema", reached]):
        out = ok("ledger", "rebuild", "--yes", *where)
        assert "equal" in out and "DIFFERENT" not in out, out   # the rebuilt ledger holds what the erased one held
    check()


# ------------------------------------------------------------------ one line, exit 2 (issue 14 item 9)
def cli(*args: str, home) -> subprocess.CompletedProcess:
    """``marlgrc ARGS`` in a process of its own, as a person runs it: what it prints, not what a
    test runner catches."""
    env = {k: v for k, v in os.environ.items() if k not in ("MARLGRC_LEDGER_PG_DSN", "MARLGRC_LEDGER_KEY")}
    return subprocess.run([sys.executable, "-m", "marlgrc", *args, "--home", str(home)], cwd=ROOT, env={
        **env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)


def assert_one_line(res: subprocess.CompletedProcess, *words: str, code: int = 2) -> str:
    """The command stopped with exit ``code`` and said why in one line, naming ``words``; no traceback."""
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    lines = res.stderr.strip().splitlines()
    assert res.returncode == code and len(lines) == 1 and lines[0].startswith("error: "), (res.returncode, res.stderr)
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def as_role(dsn: str, role: str) -> str:
    return psycopg.conninfo.make_conninfo(dsn, user=role)


def test_ledger_commands_without_a_privilege_or_a_server_say_so_in_one_line(postgres, schema, tmp_path):
    """Every ledger command run as a role that lacks a privilege it needs stops before it changes
    anything, with one line: the command, the role, what it lacks, what to do; exit 2. So do a schema
    that does not exist, a schema name PostgreSQL would not take and a server that does not answer.
    What a role may do still runs (the controls)."""
    writer = PostgresLedger(postgres.dsn, schema, user=WRITER)
    Materializer(writer).ingest(RECORDS, commit_every=100)
    writer.close()
    analyst_dsn, writer_dsn = as_role(postgres.dsn, ANALYST), as_role(postgres.dsn, WRITER)
    at = ["--schema", schema]
    ref = ["--subject-ref", SUBJECT_A.hex(), "--request-id", "r", "--requester", "dpo", "--legal-basis", "b"]
    boot = ["--bootstrap", "127.0.0.1:1", "--prefix", "none."]
    for args in (["ledger", "verify"], ["ledger", "sync", "--no-install", *boot], ["ledger", "purge"],
                 ["ledger", "erase", *ref], ["ledger", "rebuild", "--yes", *boot]):
        rebuild = args[1] == "rebuild"
        assert_one_line(cli(*args, "--postgres", analyst_dsn, *at, home=tmp_path),
                        f"`marlgrc {' '.join(args[:2])}` cannot run as role {ANALYST}",
                        *(["ownership of the schema", "superuser"] if rebuild else ["SELECT on every ledger table",
                                                                                    f"run this as {WRITER}"]))
    assert_one_line(cli("ledger", "rebuild", "--yes", *boot, "--postgres", writer_dsn, *at, home=tmp_path),
                    f"cannot run as role {WRITER}", "ownership of the schema", "superuser")
    assert_one_line(cli("ledger", "sync", *boot, "--postgres", writer_dsn, *at, home=tmp_path),
                    f"role {WRITER} may not install the ledger schema", "--no-install")
    assert_one_line(cli("ledger", "verify", "--postgres", postgres.dsn, "--schema", "no_such_schema", home=tmp_path),
                    "no ledger in schema 'no_such_schema'")
    assert_one_line(cli("ledger", "verify", "--postgres", postgres.dsn, "--schema", "Not-A-Name", home=tmp_path),
                    "--schema")
    gone = psycopg.conninfo.make_conninfo(postgres.dsn, host="127.0.0.1", port="1")
    assert_one_line(cli("ledger", "verify", "--postgres", gone, *at, home=tmp_path),
                    "cannot connect to the PostgreSQL ledger", "check the DSN")
    # nothing was changed by the refused commands, and what each role may do still runs
    led = PostgresLedger(postgres.dsn, schema)
    assert led.tombstones() == [] and led.count("joint_actions") == 24
    led.close()
    res = cli("ledger", "verify", "--postgres", writer_dsn, *at, home=tmp_path)
    assert res.returncode == 0 and "ledger verifies" in res.stdout, res.stderr
    res = cli("report", "--run", "r1", "--out", str(tmp_path / "rep"), "--postgres", analyst_dsn, *at, home=tmp_path)
    assert res.returncode == 0 and (tmp_path / "rep" / "summary.txt").exists(), res.stderr
    res = cli("ledger", "erase", *ref, "--postgres", writer_dsn, *at, home=tmp_path)
    assert res.returncode == 0 and "erased 2 rows" in res.stdout, res.stderr
    res = cli("ledger", "erase", *ref, "--postgres", writer_dsn, *at, home=tmp_path)    # the same request again
    assert res.returncode == 0 and "request r was already applied" in res.stdout, res.stderr
    led = PostgresLedger(postgres.dsn, schema)
    assert [t["request_id"] for t in led.tombstones()] == ["r"]
    led.close()


def test_verify_ledger_as_the_analyst_says_so_in_one_line(postgres, tmp_path):
    """`marlgrc verify --ledger --ledger-postgres DSN` (the schema named ledger) as the analyst: one
    line and exit 2, not a traceback. A database of its own, so its `ledger` schema is this test's."""
    db = f"marlgrc_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {db}")
    try:
        dsn = psycopg.conninfo.make_conninfo(postgres.dsn, dbname=db)
        install(dsn, "ledger")
        res = cli("verify", "--ledger", "--ledger-postgres", as_role(dsn, ANALYST), home=tmp_path)
        assert_one_line(res, f"`marlgrc verify` cannot run as role {ANALYST}", "SELECT on every ledger table", WRITER)
        res = cli("verify", "--ledger", "--ledger-postgres", as_role(dsn, WRITER), home=tmp_path)
        assert res.returncode == 0 and "ledger verifies" in res.stdout, res.stderr
    finally:
        with psycopg.connect(postgres.dsn, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def test_a_run_with_unbounded_spaces_syncs_to_postgres_as_to_sqlcipher(postgres, schema, tmp_path):
    """simple_spread's observation space is Box(-inf, inf): run.started's space records carry
    infinite limits, which PostgreSQL's jsonb refuses as bare JSON numbers; both ledgers hold them
    as the strings "-Infinity"/"Infinity" and agree on the contents."""
    import json

    from eventlog.log import EventLog, MemorySink
    from learners.replay import records_from_memory
    from producers.envs import make_env
    from producers.harness import run_episodes
    from producers.policies import RandomPolicy

    env, env_id, ver = make_env("simple_spread_v3")
    sink = MemorySink()
    log = EventLog(sink, run_id="spread-pg", producer_id="h")
    run_episodes(env, RandomPolicy(env, seed=0), log, episodes=1, seed=0, env_id=env_id, env_version=ver, config={})
    log.close()
    records = records_from_memory(sink.sent)
    pg = PostgresLedger(postgres.dsn, schema, user=WRITER)
    Materializer(pg).ingest(records, commit_every=64)
    lite = SqliteLedger(tmp_path / "l.db", KEY)
    Materializer(lite).ingest(records, commit_every=64)
    assert pg.content_hash() == lite.content_hash()
    row = pg.conn.execute("SELECT agents::text FROM runs WHERE agents IS NOT NULL").fetchone()
    assert "-Infinity" in row[0] and json.loads(row[0])  # strict JSON: the limits are strings
    pg.close()
