"""The PostgreSQL ledger against the real server from the launcher: the shared storage contract,
then the roles (writer and analyst) proven by connecting as each."""
from __future__ import annotations

import uuid

import psycopg
import pytest

from ledger import Materializer, erase_subject, purge_expired, verify_ledger
from ledger.postgres import ANALYST, WRITER, PostgresLedger, drop, install
from tests.unit.test_ledger_storage import RECORDS, SIGNER, SUBJECT_A, LedgerStorageContract, SqliteLedger, KEY

pytestmark = pytest.mark.integration


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
