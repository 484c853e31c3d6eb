"""Issue 19 fault suite: the real `marlgrc ledger sync --follow` process SIGKILLed at 20 random points
of its ingest, restarted after each kill; afterwards every event is in the ledger exactly once, the
ledger equals one synced without interruption, and `marlgrc ledger verify` passes.

The kill points come from a seeded generator. 14 are "once this process has committed a random
part of its share of what is left" (so the kills spread over the whole stream) plus 0-20 ms, so a
kill lands while a batch of 10 is read, checked, inserted or committed on the second thread; 6 are
"a random time (0-1 s) after the process started, or its first reported position if that comes
first": imports, the first key and ledger file being created, the schema install, WAL recovery, the
consumer start. How far the ledger got is read from the sync's own Prometheus endpoint (its consumer
lag against the topics' end offsets), so the test never opens the ledger while a crashed process's
WAL waits for the restart to recover it. Each restart must start from at least what the killed
process had reported committed.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from hashlib import sha256
from pathlib import Path

import pytest

from compose.services import _free_port
from eventlog.checkpoint import public_key_pem
from eventlog.kafka import EventProducer, OffsetReader
from ledger import KeyFile, SqliteLedger, sync
from ledger.tables import EVENT_TABLES
from schemas import TOPICS
from tests.unit.test_ledger_storage import KEY, SIGNER, make_run

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

SEED = 19
KILLS = 20
START_KILLS = 6          # of the 20: in the start-up
BATCH = 10               # events per transaction: ~540 transactions over the stream


def _lag(port: int) -> int | None:
    """The running sync's consumer lag in offsets (end offsets - the ledger's committed offsets, over
    every partition), from its Prometheus endpoint; None before it reported a position (or while the
    endpoint does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    lags = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("marlgrc_ledger_consumer_lag{")]
    return None if not lags else int(sum(lags))


def _sync_argv(home: Path, bootstrap: str, prefix: str, *, follow: bool, port: int | None = None) -> list[str]:
    argv = [sys.executable, "-m", "marlgrc", "ledger", "sync", "--home", str(home), "--bootstrap", bootstrap,
            "--prefix", prefix, "--batch", str(BATCH), "--no-progress"]
    if follow:
        argv += ["--follow", "--poll", "0.2"]
    if port is not None:
        argv += ["--metrics-port", str(port)]
    return argv


def test_ledger_sync_killed_at_20_random_points_loses_and_duplicates_nothing(kafka, topics, tmp_path):
    sent = make_run("r1", episodes=40, steps=25)
    producer = EventProducer(kafka.bootstrap, prefix=topics)
    for t, k, v in sent:
        producer.send(t, k, v)
    producer.flush()
    total = len(sent)
    reader = OffsetReader(kafka.bootstrap, TOPICS, topics)
    ends = sum(reader.end_offsets().values())   # offsets, transaction markers included
    reader.close()
    # the reference: the same topics synced in one go, never interrupted
    clean = SqliteLedger(tmp_path / "clean.db", KEY)
    sync(clean, kafka.bootstrap, prefix=topics, commit_every=5000)
    full = sum(clean.offsets().values())   # the offsets a finished ledger holds (ends less trailing markers)
    assert total <= full <= ends

    home = tmp_path / "home"   # the first sync creates the key file and the ledger file in it
    env = {k: v for k, v in os.environ.items() if k not in ("MARLGRC_LEDGER_KEY", "MARLGRC_LEDGER_PG_DSN")}
    env["PYTHONPATH"] = str(ROOT)
    rng = random.Random(SEED)
    # each kill: ("started", s): s seconds after the process started, or at its first reported position
    # if that comes first; or ("ingested", f): once this process committed f of its fair share of
    # what is left (what is left / the progress kills left), plus a few random milliseconds
    plan: list[tuple[str, float]] = [("ingested", rng.uniform(0.2, 1.0)) for _ in range(KILLS - START_KILLS)]
    for _ in range(START_KILLS):
        plan.insert(rng.randrange(len(plan) + 1), ("started", rng.uniform(0.0, 1.0)))

    landed: list[int | None] = []   # offsets committed, as last reported before each kill
    floor = 0                       # what an earlier process reported committed: never lost after
    for i, (kind, draw) in enumerate(plan):
        port = _free_port()
        log = tmp_path / f"sync-{i}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(_sync_argv(home, kafka.bootstrap, topics, follow=True, port=port), cwd=ROOT,
                                    env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        first: int | None = None
        seen: int | None = None
        target = None
        try:
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"sync {i} exited by itself (code {proc.returncode}) before its kill "
                                f"({kind} {draw:.3f}):\n{log.read_text()[-3000:]}")
                lag = _lag(port)
                if lag is not None:
                    seen = ends - lag
                    if first is None:
                        first = seen
                        assert first >= floor, (f"sync {i} started from {first} committed offsets, but an earlier "
                                                f"process had reported {floor}: committed batches lost")
                        share = (full - first) / (1 + sum(k == "ingested" for k, _ in plan[i + 1:]))
                        target = min(full, first + max(1, int(draw * share)))   # full: kill it idle
                if kind == "started" and (seen is not None or time.monotonic() - t0 >= draw):
                    break
                if kind == "ingested" and target is not None and seen >= target:
                    time.sleep(rng.uniform(0.0, 0.02))   # into whatever the sync does next
                    break
                if time.monotonic() - t0 > 30:
                    pytest.fail(f"sync {i} did not reach {target} committed offsets in 30 s (at {seen}):\n"
                                f"{log.read_text()[-3000:]}")
                time.sleep(0.005)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, log.read_text()[-3000:])
        landed.append(seen)
        floor = max(floor, seen or 0)

    # the kills are spread over the ingest: some in the start-up, most mid-stream
    mid = [n for n in landed if n is not None and 0 < n < full]
    assert len(set(mid)) >= 10, repr(landed)
    assert landed.count(None) >= 1, repr(landed)

    # a last, uninterrupted one-shot sync finishes the stream
    res = subprocess.run(_sync_argv(home, kafka.bootstrap, topics, follow=False), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "; 0 integrity findings" in res.stdout, res.stdout

    pem = tmp_path / "signer.pem"
    pem.write_bytes(public_key_pem(SIGNER.public_key))
    res = subprocess.run([sys.executable, "-m", "marlgrc", "ledger", "verify", "--home", str(home),
                          "--public-key", str(pem)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.splitlines()[-1] == "ledger verifies", res.stdout
    assert res.stdout.startswith(f"{total} stored events in "), res.stdout

    # the processes closed the ledger: no WAL or shared-memory file of a connection left open
    db = home / "ledger" / "ledger.db"
    assert not Path(f"{db}-wal").exists() and not Path(f"{db}-shm").exists()
    led = SqliteLedger(db, KeyFile(home / "keys" / "ledger.key"))
    try:
        ids: Counter[str] = Counter()
        digests: Counter[bytes] = Counter()
        places: Counter[tuple] = Counter()
        for table in EVENT_TABLES:
            for event_id, raw, topic, part, offset in led.query(
                    f"SELECT event_id, raw, topic, kafka_partition, kafka_offset FROM {table.name}"):
                ids[event_id] += 1
                digests[sha256(bytes(raw)).digest()] += 1
                places[(topic, part, offset)] += 1
        assert sum(ids.values()) == total and max(ids.values()) == 1          # every row once
        assert max(places.values()) == 1
        assert digests == Counter(sha256(v).digest() for _, _, v in sent)     # every event written, exactly
        assert led.count("integrity_findings") == 0
        assert led.offsets() == clean.offsets()
        assert led.content_hash() == clean.content_hash()
    finally:
        led.close()
        clean.close()


@pytest.mark.parametrize("step", ["fsync", "link"])
def test_a_key_file_creation_cut_short_leaves_no_partial_key(tmp_path, monkeypatch, step):
    """The first `ledger sync` of a home creates its key file: a kill while it does so must not leave
    an empty or partial key file, which every later sync would refuse ("must hold a 32-byte key").
    The creation is interrupted once its bytes are written (before they are synced, and before they
    are linked into place), as a SIGKILL there would stop it: afterwards there is no key file, no
    temporary file, and the next creation succeeds."""
    import ledger.keys as keys

    def cut(*_a, **_k):
        raise KeyboardInterrupt(step)

    path = tmp_path / "keys" / "ledger.key"
    with monkeypatch.context() as m:
        m.setattr(keys.os, step, cut)
        with pytest.raises(KeyboardInterrupt):
            KeyFile.create(path)
    assert not path.exists() and list(path.parent.iterdir()) == []
    assert len(KeyFile.create(path).ledger_key()) == 32
