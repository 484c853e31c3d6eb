"""The ledger's C batch writer (ledger/_rowwrite.c via ledger/nativewrite.py): it writes exactly what
executemany writes, refuses what it cannot bind before touching the database, and a failure anywhere
in its transaction leaves the database as it was."""
from __future__ import annotations

import math
import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sqlcipher3.dbapi2 as sqlcipher   # a dependency (requirements.lock): missing it fails, never skips

from ledger import nativewrite

SQL = "INSERT INTO t (a, b, c, d) VALUES (?, ?, ?, ?)"


def _connect(path):
    conn = sqlcipher.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA key = \"x'" + "ab" * 32 + "'\"")
    conn.execute("CREATE TABLE IF NOT EXISTS t (a, b, c, d)")
    conn.execute("CREATE TABLE IF NOT EXISTS u (k INTEGER PRIMARY KEY, v TEXT NOT NULL)")
    return conn


@pytest.fixture()
def db(tmp_path):
    conn = _connect(tmp_path / "n.db")
    writer = nativewrite.attach(conn, tmp_path / "n.db")
    assert writer is not None, "the C writer must build and attach here (a C compiler is a requirement)"
    yield conn, writer
    del writer
    conn.close()


values = st.one_of(
    st.none(),
    st.integers(min_value=-2**63, max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.text(),
    st.binary(),
    st.booleans(),
)
rows = st.lists(st.tuples(values, values, values, values), max_size=40)


@settings(max_examples=60, deadline=None)
@given(batch=rows)
def test_writes_exactly_what_executemany_writes(tmp_path_factory, batch):
    d = tmp_path_factory.mktemp("w")
    native = _connect(d / "native.db")
    plain = _connect(d / "plain.db")
    writer = nativewrite.attach(native, d / "native.db")
    assert writer.start([(SQL, batch)]).wait() == len(batch)
    plain.execute("BEGIN")
    plain.executemany(SQL, batch)
    plain.execute("COMMIT")
    q = "SELECT a, typeof(a), b, typeof(b), c, typeof(c), d, typeof(d) FROM t ORDER BY rowid"
    assert native.execute(q).fetchall() == plain.execute(q).fetchall()
    assert not native.in_transaction


def test_several_statements_are_one_transaction_and_a_failure_rolls_all_back(db):
    conn, writer = db
    writer.start([(SQL, [(1, 2, 3, 4)])]).wait()
    job = writer.start([(SQL, [(5, 6, 7, 8)] * 3),
                        ("INSERT INTO u (k, v) VALUES (?, ?)", [(1, "x"), (2, None)])])   # NOT NULL fails
    with pytest.raises(nativewrite.write_error()) as exc:
        job.wait()
    code, message, statement = exc.value.args
    assert code & 0xFF == 19 and "NOT NULL" in message and statement == 1
    assert conn.execute("SELECT COUNT(*) FROM t").fetchone() == (1,)
    assert conn.execute("SELECT COUNT(*) FROM u").fetchone() == (0,)
    assert not conn.in_transaction
    assert writer.start([("INSERT INTO u (k, v) VALUES (?, ?)", [(1, "x")])]).wait() == 1   # usable again


def test_a_value_it_cannot_bind_is_refused_before_anything_is_written(db):
    conn, writer = db
    with pytest.raises(TypeError, match="list"):
        writer.start([(SQL, [(1, 2, 3, 4), (1, 2, [3], 4)])])
    with pytest.raises(OverflowError):
        writer.start([(SQL, [(2**63, 2, 3, 4)])])
    with pytest.raises(TypeError, match="not a tuple of 4"):
        writer.start([(SQL, [(1, 2, 3, 4), (1, 2, 3)])])
    assert conn.execute("SELECT COUNT(*) FROM t").fetchone() == (0,)
    assert not conn.in_transaction


def test_a_statement_with_another_parameter_count_or_bad_sql_fails_clearly(db):
    conn, writer = db
    with pytest.raises(nativewrite.write_error(), match="takes 4 parameters, rows have 2"):
        writer.start([(SQL, [(1, 2)])]).wait()
    with pytest.raises(nativewrite.write_error(), match="no such table"):
        writer.start([("INSERT INTO nowhere VALUES (?)", [(1,)])]).wait()
    assert not conn.in_transaction


def test_one_job_at_a_time_and_an_unwaited_job_is_joined_on_release(db):
    conn, writer = db
    job = writer.start([(SQL, [(i, str(i), float(i), bytes([i % 256])) for i in range(2000)])])
    with pytest.raises(RuntimeError, match="still running"):
        writer.start([(SQL, [(1, 2, 3, 4)])])
    del job   # joins the thread before freeing what it reads
    assert conn.execute("SELECT COUNT(*), SUM(a) FROM t").fetchone() == (2000, sum(range(2000)))
    assert writer.start([(SQL, [(1, 2, 3, 4)])]).wait() == 1


def test_nan_and_infinities_are_stored_as_sqlite_stores_them(db):
    conn, writer = db
    writer.start([(SQL, [(math.inf, -math.inf, math.nan, 0.0)])]).wait()
    assert conn.execute("SELECT a, b, c FROM t").fetchone() == (math.inf, -math.inf, None)


def test_no_writer_for_a_connection_that_cannot_load_it_or_another_file(tmp_path):
    std = sqlite3.connect(tmp_path / "std.db")
    if not hasattr(std, "enable_load_extension"):
        assert nativewrite.attach(std, tmp_path / "std.db") is None
    conn = _connect(tmp_path / "a.db")
    assert nativewrite.attach(conn, tmp_path / "elsewhere.db") is None   # the handle must be this file's
    with pytest.raises(sqlcipher.OperationalError, match="not authorized"):
        conn.execute("SELECT load_extension(?)", (nativewrite.module().__file__,))   # loading is off again
