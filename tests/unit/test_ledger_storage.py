"""Ledger storage, written once (``LedgerStorageContract``) and run against every backend by
subclassing: SQLCipher here, PostgreSQL in tests/integration/test_ledger_postgres.py.

Also here: the pieces only the SQLCipher file has (key, mode, plaintext on disk)."""
from __future__ import annotations

import os
import threading
import time
from hashlib import sha256

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from eventlog.chain import MICROS_PER_DAY
from eventlog.checkpoint import Signer
from eventlog.codec import default_codec
from eventlog.kafka import Record
from eventlog.log import EventLog, MemorySink
from eventlog.merkle import merkle_root
from eventlog.verify import BreakKind
from ledger import (EnvKey, KeyFile, LedgerKeyError, Materializer, SqliteLedger, StaticKey, erase_subject,
                    purge_expired, verify_ledger)
from ledger.ingest import check_batch
from ledger.store import LedgerError
from tests import corruptions
from tests.synthetic import synthetic_run

SIGNER = Signer.from_seed(b"ledger-tests")
KEY = StaticKey(bytes(range(32)))
SUBJECT_A = sha256(b"subject-key-A" + b"user:alice@example.org").digest()   # stands in for the HMAC pseudonym
SUBJECT_B = sha256(b"subject-key-B" + b"user:bob@example.org").digest()
MARKER = "CANARY-7f3e9b2c-plaintext-marker"
OLD = 400 * MICROS_PER_DAY  # older than every retention except public (checkpoints)


def _clocked(log: EventLog, topic: str, chain: str, start: int):
    t = iter(range(start, start + 10_000_000))
    log.writer(topic, chain).clock = lambda: next(t)


def make_run(run: str, *, age_micros: int = 0, episodes: int = 3, steps: int = 8, agents: int = 2) -> list[tuple]:
    """A run with every event type the ledger has a table for: the demo stream, credit, fairness,
    a policy update with lineage, and observations carrying two data subjects' protected fields."""
    sink = MemorySink()
    log = EventLog(sink, run_id=run, producer_id="p", signer=SIGNER, checkpoint_every=16)
    start = time.time_ns() // 1000 - age_micros
    chains = [("marl.run.lifecycle", f"{run}:lifecycle"), ("marl.env.state", f"{run}:env"),
              ("marl.joint.action", f"{run}:actions"), ("marl.di.credit", f"{run}:credit"),
              ("marl.fairness.metrics", f"{run}:fairness"), ("marl.policy.update", f"{run}:policy:ppo"),
              ("marl.agent.observation", f"{run}:subjects")]
    chains += [("marl.agent.observation", f"{run}:obs:agent_{i}") for i in range(agents)]
    for topic, chain in chains:
        _clocked(log, topic, chain, start)
    synthetic_run(log, episodes=episodes, steps=steps, agents=agents, seed=7)
    actions = [v for t, k, v in sink.sent if t == "marl.joint.action"]
    codec = log.codec
    for v in actions:
        _, rec = codec.decode(v)
        reward = sum(a["reward"] for a in rec["actions"])
        log.append(f"{run}:credit", "di.credit", {
            "episode": rec["episode"], "step": rec["step"], "joint_action_hash": v[-32:], "raw_reward": reward,
            "global_reward": max(-1.0, min(1.0, reward)), "penalties": [],
            "shares": [{"agent_id": a["agent_id"], "credit": reward / agents, "rule": "equal"} for a in rec["actions"]]},
            rule_version="di-1", source_event_hashes=[v[-32:]])
    for ep in range(episodes):
        log.append(f"{run}:fairness", "fairness.metrics", {
            "episode": ep, "window": "episode", "window_start": ep * steps, "window_end": (ep + 1) * steps,
            "metrics": [{"name": "gini", "value": 0.1 * ep}, {"name": f"note {MARKER}", "value": 1.0}],
            "agent_metrics": []})
    log.append(f"{run}:policy:ppo", "policy.update", {
        "algorithm": "ppo", "config_hash": "c" * 64, "seed": 7, "parent_policy_version": "", "policy_updated": True,
        "optimizer_steps": 4, "env_steps": episodes * steps, "losses": [{"name": "losses/policy", "value": 0.5}],
        "weights_sha256": bytes(32), "verified": True,
        "lineage": [{"topic": "marl.joint.action", "partition": 0, "first_offset": 0, "last_offset": 5,
                     "chain_id": f"{run}:actions", "first_seq": 0, "last_seq": 5, "head_event_hash": actions[5][-32:]}]},
        policy_version="v1")
    for i, ref in enumerate([SUBJECT_A, SUBJECT_B, SUBJECT_A, SUBJECT_B]):
        ct = AESGCM(sha256(ref).digest()).encrypt(bytes(12), b"alice@example.org" if ref == SUBJECT_A else b"bob",
                                                  f"{run}:subjects|{i}|email".encode())
        log.append(f"{run}:subjects", "agent.observation", {
            "episode": 0, "step": i, "agent_id": "agent_0", "observation": [0.0, 1.0],
            "protected_fields": [{"namespace": "user", "field": "email", "subject_ref": ref,
                                  "ciphertext": bytes(12) + ct}]})
    log.close()
    return sink.sent


def to_records(sent: list[tuple], partitions: int = 3) -> list[Record]:
    offs: dict = {}
    out = []
    for t, k, v in sent:
        p = sum(k.encode()) % partitions
        o = offs.get((t, p), 0)
        offs[(t, p)] = o + 1
        out.append(Record(t, p, o, k, v, 0))
    return out


def _sealed(rec: dict) -> bytes:
    """``rec`` encoded with its event_hash recomputed: an event a writer with no key could forge."""
    v = default_codec().encode(SCHEMA_OF[rec["event_type"]], dict(rec, event_hash=bytes(32)))
    return v[:-32] + sha256(v[:-32]).digest()


SCHEMA_OF = {"joint.action": "joint_action"}


def _action(chain: str, seq: int, prev: bytes, event_id: str) -> dict:
    return {"prev_event_hash": prev, "seq": seq, "chain_id": chain, "event_id": event_id, "event_type": "joint.action",
            "run_id": "r", "produced_at": 1, "producer_id": "p", "data_classification": "internal",
            "retention_expiry": 2**62, "feature_schema_version": "1", "policy_version": "", "rule_version": "",
            "source_event_hashes": [], "episode": 0, "step": seq, "actions": [], "joint_vector": [],
            "event_hash": bytes(32)}


def deletion_events(erasures: list[tuple[bytes, str]], producer: str = "forget-test") -> list[tuple]:
    """``compliance.deletion`` events as ``marlgrc forget`` publishes them, one per (subject_ref,
    request id), on the deletions chain, signed in a checkpoint."""
    sink = MemorySink()
    log = EventLog(sink, run_id="compliance", producer_id=producer, signer=SIGNER)
    for ref, request_id in erasures:
        log.append("compliance:deletions", "compliance.deletion", {
            "request_id": request_id, "requester": "dpo@example.org", "legal_basis": "GDPR Art. 17(1)(a)",
            "namespace": "user", "subject_ref": ref,
            "actions": [{"target": "keystore.subject_keys", "count": 1}]})
    log.close()
    return sink.sent


RECORDS = to_records(make_run("r1"))
OLD_AND_NEW = to_records(make_run("r0", age_micros=OLD) + make_run("r1"))
# run r1 and the erasure of SUBJECT_A (request req-1); ERASING[DELETION] is the compliance.deletion event
ERASING = to_records(make_run("r1") + deletion_events([(SUBJECT_A, "req-1")]))
DELETION = next(i for i, r in enumerate(ERASING) if r.topic == "marl.compliance.deletions")


def subject_rows(led, ref: bytes) -> int:
    return sum(led.query(f"SELECT COUNT(*) FROM {t} WHERE subject_refs LIKE {led.ph}", (f"%{ref.hex()}%",))[0][0]
               for t in ("agent_observations", "environment_states"))


def erased_under(led, request_id: str) -> int:
    """Rows deleted under ``request_id``, by its evidence rows (every deletion of it, late rows too)."""
    return led.query(f"SELECT COALESCE(SUM(row_count), 0) FROM deletion_events WHERE request_id = {led.ph} "
                     f"AND topic IS NOT NULL", (request_id,))[0][0]


def expected_counts(records) -> dict[str, int]:
    from eventlog.codec import default_codec
    from ledger.tables import SCHEMA_TABLE

    codec = default_codec()
    out: dict[str, int] = {}
    for r in records:
        t = SCHEMA_TABLE[codec.schema_for(r.value)]
        out[t] = out.get(t, 0) + 1
    return out


class LedgerStorageContract:
    """Behaviour every ledger backend must have. Subclasses provide ``new_ledger()`` (an empty
    ledger, as the writing role), ``delete_behind_the_back(ledger, table, chain, seq)`` (as an
    attacker or a careless admin with direct database access) and ``raw_update(ledger, sql)`` /
    ``raw_delete(ledger, sql)``, which must fail."""

    def new_ledger(self):
        raise NotImplementedError

    def delete_behind_the_back(self, ledger, table: str, chain: str, seq: int) -> None:
        raise NotImplementedError

    def ingested(self, records=RECORDS, commit_every=37):
        led = self.new_ledger()
        Materializer(led).ingest(records, commit_every=commit_every)
        return led

    def test_every_event_lands_in_its_table_and_verifies(self):
        led = self.ingested()
        counts = led.table_counts()
        for table, n in expected_counts(RECORDS).items():
            assert counts[table] == n, table
        assert counts["policy_update_lineage"] == 1
        assert counts["integrity_findings"] == 0
        report = verify_ledger(led, SIGNER.public_key)
        assert report.ok, report.lines()
        assert report.chains.events == len(RECORDS)
        assert sum(c.checkpoints_verified for c in report.chains.chains) > 0

    def test_duplicate_writes_are_idempotent_and_reported(self):
        led = self.ingested()
        again = [r._replace(offset=r.offset + 10_000) for r in RECORDS[:20]]   # the same events at new offsets
        stats = Materializer(led).ingest(again, commit_every=7)
        assert sum(led.table_counts()[t] for t in expected_counts(RECORDS)) == len(RECORDS)
        assert [f.kind for f in stats.findings] == ["duplicated"] * 20
        assert all(f"offset {r.offset - 10_000}" in f.detail for f, r in zip(stats.findings, again))

    def test_reading_the_same_records_again_is_idempotent_and_silent(self):
        led = self.ingested()
        before = led.table_counts()
        stats = Materializer(led).ingest(RECORDS[:20], commit_every=7)   # offsets rewound: same records
        assert stats.findings == [] and stats.records == 20
        assert led.table_counts() == before and led.findings() == []

    def test_an_event_id_stored_with_other_bytes_is_a_finding_and_fails_verify(self):
        """Issue 14 item 4: another event under a stored event_id is never dropped silently, whether
        it arrives as its chain's next event (caught by the insert) or behind its head."""
        led = self.ingested()
        codec = default_codec()
        stored = next(r for r in RECORDS if r.key == "r1:actions" and codec.decode(r.value)[1]["seq"] == 4)
        _, rec = codec.decode(stored.value)
        # a forged chain of its own whose first event reuses a stored event_id: its chain's next event
        forged = _sealed(dict(rec, chain_id="r9:actions", seq=0, prev_event_hash=bytes(32)))
        # and a re-sealed edit of the stored event itself, behind its chain's head
        edited = _sealed(dict(rec, episode=rec["episode"] + 100))
        stats = Materializer(led).ingest([
            Record("marl.joint.action", 0, 90_000, "r9:actions", forged, 0),
            Record("marl.joint.action", stored.partition, 90_001, "r1:actions", edited, 0)], commit_every=10)
        assert sorted((f.offset, f.kind, f.chain_id, f.event_id) for f in stats.findings) == [
            (90_000, "edited", "r9:actions", rec["event_id"]), (90_001, "edited", "r1:actions", rec["event_id"])]
        for f in stats.findings:
            assert f"event_id {rec['event_id']} is already in the ledger with other bytes" in f.detail
            assert f"from marl.joint.action partition {stored.partition} offset {stored.offset}" in f.detail
        (raw,), = led.query(f"SELECT raw FROM joint_actions WHERE event_id = {led.ph}", (rec["event_id"],))
        assert bytes(raw) == stored.value   # the stored row is never replaced
        assert led.count("joint_actions") == expected_counts(RECORDS)["joint_actions"]
        assert [f.kind for f in led.findings()] == ["edited", "edited"]
        report = verify_ledger(led, SIGNER.public_key)
        assert not report.ok and report.chains.ok   # the stored chains are intact; the findings fail it
        assert sum("is already in the ledger with other bytes" in line for line in report.lines()) == 2

    def test_seq_starts_at_0_and_grows_by_1(self):
        """Correct links but seqs that skip, start late, repeat or step back are breaks of the
        verifier's kinds; every event is still stored."""
        def chain(seqs, name):
            """Each event links to the one before it; a second event with the same seq (a fork) links
            where the first did, and the chain goes on from the first."""
            out, links, first = [], [], {}
            for i, seq in enumerate(seqs):
                if i == 0:
                    prev = bytes(32)
                elif seq == seqs[i - 1]:
                    prev = links[-1]
                else:
                    prev = first[seqs[i - 1]]
                v = _sealed(_action(name, seq, prev, event_id=f"{name}-{i}"))
                out.append(Record("marl.joint.action", 0, i, name, v, 0))
                links.append(prev)
                first.setdefault(seq, v[-32:])
            return out

        cases = {
            "c-skips": ([0, 2, 4], [("missing", 2, "seq 1..1 missing"), ("missing", 4, "seq 3..3 missing")]),
            "c-late": ([3, 4], [("missing", 3, "seq 0..2 missing before seq 3")]),
            "c-back": ([0, 2, 1], [("missing", 2, "seq 1..1 missing"), ("reordered", 1, "seq 1 arrives after seq 2")]),
            "c-fork": ([0, 1, 1, 2], [("inserted", 1, "seq 1 is already held by another event")]),
        }
        for name, (seqs, want) in cases.items():
            led = self.new_ledger()
            stats = Materializer(led).ingest(chain(seqs, name), commit_every=100)
            got = [(f.kind, f.seq, f.detail) for f in stats.findings]
            assert [(k, s) for k, s, _ in got] == [(k, s) for k, s, _ in want], (name, got)
            assert all(d.startswith(w) for (_, _, d), (_, _, w) in zip(got, want)), (name, got)
            assert led.count("joint_actions") == len(seqs), name
            assert not verify_ledger(led).ok, name
        # the same out-of-place events, each in a batch of its own: the store tells reordered from inserted
        for name, (seqs, want) in cases.items():
            led = self.new_ledger()
            stats = Materializer(led).ingest(chain(seqs, name), commit_every=1)
            assert [(f.kind, f.seq) for f in stats.findings] == [(k, s) for k, s, _ in want], name

    def test_crash_inside_a_transaction_loses_and_duplicates_nothing(self):
        clean = self.ingested()
        led = self.new_ledger()
        m = Materializer(led)
        real_statements, calls = led._tail_statements, {"n": 0}

        def crashing_statements(*args):
            # the fourth transaction fails after its rows and offsets, just before its COMMIT: a real
            # failure inside the backend's transaction
            calls["n"] += 1
            out = real_statements(*args)
            return out + [("SELECT no_such_column FROM ingest_offsets", [()])] if calls["n"] == 4 else out

        led._tail_statements = crashing_statements
        with pytest.raises(Exception, match="no_such_column"):
            m.ingest(RECORDS, commit_every=37)
        led._tail_statements = real_statements
        committed = led.offsets()
        assert 0 < sum(committed.values()) < len(RECORDS)
        rest = [r for r in RECORDS if r.offset >= committed.get((r.topic, r.partition), 0)]
        stats = Materializer(led).ingest(rest, commit_every=37)     # the restart, from stored offsets
        assert stats.findings == []
        assert led.content_hash() == clean.content_hash()

    def test_concurrent_writers_do_not_duplicate(self):
        led_a, led_b = self.new_ledger(), None
        led_b = self.reopen(led_a)
        errors = []

        def run(led):
            try:
                Materializer(led).ingest(RECORDS, commit_every=25)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(x,)) for x in (led_a, led_b)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert not errors, errors
        counts = led_a.table_counts()
        assert all(counts[t] == n for t, n in expected_counts(RECORDS).items())

    def test_rows_are_append_only(self):
        led = self.ingested()
        with pytest.raises(Exception, match="append-only|permission|denied"):
            self.raw_sql(led, "UPDATE joint_actions SET team_reward = 99")
        with pytest.raises(Exception, match="append-only|permission|denied"):
            self.raw_sql(led, "DELETE FROM joint_actions")
        erase_subject(led, SUBJECT_A, "req-1", "dpo", "GDPR Art. 17")   # gives deletion_events rows
        with pytest.raises(Exception, match="append-only|permission|denied"):
            self.raw_sql(led, "DELETE FROM deletion_events")
        assert led.count("joint_actions") == expected_counts(RECORDS)["joint_actions"]

    def test_foreign_keys_are_enforced(self):
        led = self.ingested()
        row = {"policy_update_event_id": "no-such-update", "idx": 0, "lineage_topic": "t", "lineage_partition": 0,
               "first_offset": 0, "last_offset": 0, "chain_id": "c", "first_seq": 0, "last_seq": 0,
               "head_event_hash": bytes(32)}
        with pytest.raises(LedgerError):
            led.write({"policy_update_lineage": [row]}, {})

    def test_purge_deletes_expired_rows_with_evidence_and_still_verifies(self):
        led = self.ingested(OLD_AND_NEW)
        summary = purge_expired(led)
        old = [r for r in OLD_AND_NEW if r.key.startswith("r0:") and r.topic != "marl.audit.checkpoints"]
        assert summary.total == len(old)
        assert sum(e.count for e in summary.evidence) == len(old)
        assert led.query("SELECT COUNT(*) FROM joint_actions WHERE run_id = 'r0'")[0][0] == 0
        assert led.query("SELECT COUNT(*) FROM joint_actions WHERE run_id = 'r1'")[0][0] > 0
        assert led.count("policy_update_lineage") == 1   # r0's lineage went with its update (cascade)
        actions = [e for e in summary.evidence if e.chain_id == "r0:actions"]
        assert len(actions) == 1
        hashes = [r.value[-32:] for r in old if r.key == "r0:actions"]
        assert actions[0].merkle_root == merkle_root(hashes) and actions[0].head_hash == hashes[-1]
        assert actions[0].prev_hash == bytes(32) and actions[0].first_seq == 0
        assert led.tombstones()[-1]["kind"] == "retention"
        report = verify_ledger(led, SIGNER.public_key)
        assert report.ok, report.lines()
        assert report.checkpoints_bridged > 0 and len(report.bridged) == len(summary.evidence)

    def test_a_row_deleted_behind_the_purges_back_is_a_break(self):
        led = self.ingested(OLD_AND_NEW)
        purge_expired(led)
        self.delete_behind_the_back(led, "joint_actions", "r1:actions", 3)
        report = verify_ledger(led, SIGNER.public_key)
        assert not report.ok
        (brk,) = report.chains.breaks
        assert brk.chain_id == "r1:actions" and brk.kind == BreakKind.MISSING and brk.seq == 3

    def test_erasure_removes_the_subjects_rows_with_a_tombstone(self):
        led = self.ingested()
        summary = erase_subject(led, SUBJECT_A, "req-1", "dpo@example.org", "GDPR Art. 17")
        assert summary.counts["agent_observations"] == 2 and summary.total == 2
        assert led.query(f"SELECT COUNT(*) FROM agent_observations WHERE subject_refs LIKE {led.ph}",
                         (f"%{SUBJECT_A.hex()}%",))[0][0] == 0
        assert led.query(f"SELECT COUNT(*) FROM agent_observations WHERE subject_refs LIKE {led.ph}",
                         (f"%{SUBJECT_B.hex()}%",))[0][0] == 2
        tomb = led.tombstones()[-1]
        assert (tomb["kind"], tomb["request_id"], tomb["requester"], tomb["legal_basis"]) == (
            "erasure", "req-1", "dpo@example.org", "GDPR Art. 17")
        assert tomb["counts"]["agent_observations"] == 2
        report = verify_ledger(led, SIGNER.public_key)
        assert report.ok, report.lines()
        assert {(e.chain_id, e.first_seq) for e in report.bridged} == {("r1:subjects", 0), ("r1:subjects", 2)}

    def test_erasure_is_idempotent_per_request(self):
        """Issue 14 item 6: the same request id for the same subject again (a resumed `forget`, or the
        sync meeting the deletion event of an erasure `forget` applied) writes no second tombstone and
        returns the first one's counts; rows of the subject stored since are deleted under the same
        request, with evidence. Another subject under the same request id is another erasure."""
        led = self.ingested()
        first = erase_subject(led, SUBJECT_A, "req-1", "dpo", "GDPR Art. 17")
        assert not first.repeated and first.counts["agent_observations"] == 2 and len(first.evidence) == 2
        again = erase_subject(led, SUBJECT_A, "req-1", "dpo", "GDPR Art. 17")
        assert again.repeated and again.counts == first.counts and again.total == 2
        assert again.evidence == [] and again.late == 0
        assert [(t["kind"], t["request_id"]) for t in led.tombstones()] == [("erasure", "req-1")]
        # rows of the subject written by a writer that did not know of the erasure (a run r2 stored whole)
        late = check_batch(to_records(make_run("r2")), {})
        led.write(late.rows, {})
        assert subject_rows(led, SUBJECT_A) == 2
        third = erase_subject(led, SUBJECT_A, "req-1", "dpo", "GDPR Art. 17")
        assert third.repeated and third.counts == first.counts and third.late == 2
        assert {(e.chain_id, e.first_seq) for e in third.evidence} == {("r2:subjects", 0), ("r2:subjects", 2)}
        assert subject_rows(led, SUBJECT_A) == 0 and subject_rows(led, SUBJECT_B) == 4
        assert [t["request_id"] for t in led.tombstones()] == ["req-1"] and erased_under(led, "req-1") == 4
        other = erase_subject(led, SUBJECT_B, "req-1", "dpo", "GDPR Art. 17")
        assert not other.repeated and other.counts["agent_observations"] == 4
        assert [t["request_id"] for t in led.tombstones()] == ["req-1", "req-1"]
        report = verify_ledger(led, SIGNER.public_key)
        assert report.ok, report.lines()

    @pytest.mark.parametrize("where, commit_every", [
        ("first", 1), ("first", 1000), ("middle", 7), ("last", 1), ("last", 1000)])
    def test_a_deletion_event_erases_its_subject_whatever_order_the_rows_arrive_in(self, where, commit_every):
        """Issue 14 item 6: the sync applies the compliance.deletion events it ingests. Rows of the
        subject stored before the event are erased in the event's transaction with a tombstone; rows
        that arrive after it (a later batch, or the same one) are erased in their own batch's
        transaction under the same request, with no second tombstone. Whatever the order, the ledger
        ends with the same contents."""
        rest = ERASING[:DELETION] + ERASING[DELETION + 1:]
        at = {"first": 0, "middle": len(rest) // 2, "last": len(rest)}[where]
        led = self.new_ledger()
        stats = Materializer(led).ingest(rest[:at] + [ERASING[DELETION]] + rest[at:], commit_every=commit_every)
        assert stats.findings == [] and stats.deletions == ["req-1"] and stats.erased_rows == 2
        assert subject_rows(led, SUBJECT_A) == 0 and subject_rows(led, SUBJECT_B) == 2
        assert [(t["kind"], t["request_id"]) for t in led.tombstones()] == [("erasure", "req-1")]
        assert erased_under(led, "req-1") == 2
        assert led.count("compliance_deletions") == 1
        report = verify_ledger(led, SIGNER.public_key)
        assert report.ok, report.lines()
        assert {(e.chain_id, e.first_seq) for e in report.bridged} == {("r1:subjects", 0), ("r1:subjects", 2)}
        # the same contents as the ledger where the deletion event comes last, in one batch
        reference = self.new_ledger()
        Materializer(reference).ingest(rest + [ERASING[DELETION]], commit_every=10_000)
        assert led.content_hash() == reference.content_hash()
        # and a restart (the erased subjects read back from the store) keeps erasing its late rows
        again = Materializer(led)
        assert set(again.erased) == {SUBJECT_A}
        late_records = [r._replace(offset=r.offset + 50_000) for r in to_records(make_run("r2"))]
        stats = again.ingest(late_records, commit_every=5)
        assert stats.deletions == [] and stats.erased_rows == 2
        assert subject_rows(led, SUBJECT_A) == 0 and subject_rows(led, SUBJECT_B) == 4
        assert len(led.tombstones()) == 1 and erased_under(led, "req-1") == 4

    def test_a_deletion_event_the_ledger_already_applied_adds_no_tombstone(self):
        """`forget` erased this ledger itself, then the sync reads its compliance.deletion event."""
        led = self.ingested(ERASING[:DELETION] + ERASING[DELETION + 1:])
        first = erase_subject(led, SUBJECT_A, "req-1", "dpo@example.org", "GDPR Art. 17(1)(a)")
        stats = Materializer(led).ingest([ERASING[DELETION]])
        assert stats.findings == [] and stats.erased_rows == 0
        tombstones = led.tombstones()
        assert [t["request_id"] for t in tombstones] == ["req-1"] and tombstones[0]["counts"] == first.counts
        assert subject_rows(led, SUBJECT_A) == 0 and erased_under(led, "req-1") == 2
        assert verify_ledger(led, SIGNER.public_key).ok

    def test_deletion_events_stored_without_their_erasure_are_applied_by_the_next_sync(self):
        """A ledger synced before the sync applied deletion events holds the event and the subject's
        rows: the next sync (``Materializer.apply_stored_deletions``) erases them, once."""
        led = self.new_ledger()
        old = check_batch(ERASING, {})          # written as a sync without erasure wrote it
        led.write(old.rows, old.offsets)
        assert subject_rows(led, SUBJECT_A) == 2 and led.tombstones() == []
        m = Materializer(led)
        (summary,) = m.apply_stored_deletions()
        assert summary.request_id == "req-1" and summary.total == 2 and not summary.repeated
        assert subject_rows(led, SUBJECT_A) == 0 and set(m.erased) == {SUBJECT_A}
        assert Materializer(led).apply_stored_deletions() == []
        assert len(led.tombstones()) == 1 and verify_ledger(led, SIGNER.public_key).ok

    def test_an_edited_event_is_a_finding_at_ingest_and_a_break_on_verify(self):
        records, kind, marker = corruptions.edited_payload(RECORDS, "marl.joint.action", "r1:actions", 5)
        led = self.new_ledger()
        stats = Materializer(led).ingest(records, commit_every=50)
        assert [(f.kind, f.chain_id, f.seq) for f in stats.findings] == [("edited", "r1:actions", 5)]
        report = verify_ledger(led, SIGNER.public_key)
        assert not report.ok and report.chains.breaks[0].kind == kind

    def test_content_hash_is_reproducible(self):
        assert self.ingested(commit_every=11).content_hash() == self.ingested(commit_every=1000).content_hash()

    def test_analysis_views(self):
        led = self.ingested()
        conv = led.query("SELECT episode, steps FROM v_reward_convergence WHERE run_id = 'r1' ORDER BY episode")
        assert conv == [(0, 8), (1, 8), (2, 8)]
        credit = led.query("SELECT agent_id, SUM(credit) FROM v_credit_per_agent WHERE run_id = 'r1' "
                           "GROUP BY agent_id ORDER BY agent_id")
        total = led.query("SELECT SUM(raw_reward) FROM di_credit_assignment")[0][0]
        assert [a for a, _ in credit] == ["agent_0", "agent_1"]
        assert sum(c for _, c in credit) == pytest.approx(total)
        gini = led.query("SELECT value FROM v_fairness_over_time WHERE metric = 'gini' ORDER BY window_end")
        assert [round(v, 6) for (v,) in gini] == [0.0, 0.1, 0.2]


class TestSqlCipherStorage(LedgerStorageContract):
    @pytest.fixture(autouse=True)
    def _dir(self, tmp_path):
        self.dir = tmp_path
        self.n = 0
        yield

    def new_ledger(self):
        self.n += 1
        return SqliteLedger(self.dir / f"ledger{self.n}.db", KEY)

    def reopen(self, led):
        return SqliteLedger(led.path, KEY)

    def raw_sql(self, led, sql):
        led.conn.execute(sql)

    def delete_behind_the_back(self, led, table, chain, seq):
        # someone with the key and their own connection, where the deletion gate answers yes
        led.conn.create_function("ledger_deletion_allowed", 0, lambda: 1)
        led.conn.execute(f"DELETE FROM {table} WHERE chain_id = ? AND seq = ?", (chain, seq))


# ------------------------------------------------------------------ SQLCipher only
def test_file_is_0600_and_wrong_key_is_one_clear_error(tmp_path, capfd):
    path = tmp_path / "l.db"
    led = SqliteLedger(path, KEY)
    Materializer(led).ingest(RECORDS[:30])
    led.close()
    assert os.stat(path).st_mode & 0o777 == 0o600
    wrong = StaticKey(bytes(32))
    with pytest.raises(LedgerKeyError) as exc:
        SqliteLedger(path, wrong)
    msg = str(exc.value)
    assert "does not decrypt" in msg and str(path) in msg
    assert bytes(32).hex() not in msg and KEY.key.hex() not in msg
    assert "hmac check failed" not in capfd.readouterr().err


def test_a_ledger_made_with_sqlcipher4_defaults_still_opens_and_a_new_one_uses_v2(tmp_path, monkeypatch):
    import ledger.store as store

    old = tmp_path / "old.db"
    monkeypatch.setattr(store, "CIPHER_PROFILES", store.CIPHER_PROFILES[1:])  # as before 2026-11-21
    led = SqliteLedger(old, KEY)
    Materializer(led).ingest(RECORDS[:30])
    before = led.content_hash()
    led.close()
    monkeypatch.undo()
    reopened = SqliteLedger(old, KEY)
    assert reopened.cipher_profile == "sqlcipher4" and reopened.content_hash() == before
    Materializer(reopened).ingest(RECORDS[30:60])          # and it keeps growing in its own format
    assert reopened.count("runs") + reopened.count("environment_states") > 0
    reopened.close()
    assert SqliteLedger(old, KEY).cipher_profile == "sqlcipher4"
    with pytest.raises(LedgerKeyError, match="does not decrypt"):
        SqliteLedger(old, StaticKey(bytes(32)))
    new = SqliteLedger(tmp_path / "new.db", KEY)
    assert new.cipher_profile == "v2"
    assert int(new.query("PRAGMA page_size")[0][0]) == store.PAGE_SIZE
    plain = SqliteLedger(tmp_path / "plain.db", None, encrypted=False)
    assert int(plain.query("PRAGMA page_size")[0][0]) == store.PAGE_SIZE   # the benchmark's baseline: same pages


def test_a_ledger_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "l.db"
    SqliteLedger(path, KEY).close()
    os.chmod(path, 0o644)
    with pytest.raises(LedgerError, match="chmod 600"):
        SqliteLedger(path, KEY)


def test_known_value_is_nowhere_in_the_file_or_wal_in_plaintext(tmp_path):
    # control: a plain SQLite ledger does hold the marker in plaintext, so the check can fail
    plain = SqliteLedger(tmp_path / "plain.db", None, encrypted=False)
    Materializer(plain).ingest(RECORDS)
    disk = b"".join(p.read_bytes() for p in tmp_path.glob("plain.db*"))
    assert MARKER.encode() in disk
    led = SqliteLedger(tmp_path / "enc.db", KEY)
    Materializer(led).ingest(RECORDS)
    assert (tmp_path / "enc.db-wal").exists() and (tmp_path / "enc.db-wal").stat().st_size > 0
    assert led.query("SELECT COUNT(*) FROM fairness_metrics WHERE metrics LIKE ?", (f"%{MARKER}%",))[0][0] == 3
    for p in tmp_path.glob("enc.db*"):
        data = p.read_bytes()
        for needle in (MARKER.encode(), b"r1:actions", SUBJECT_A.hex().encode(), SUBJECT_A):
            assert needle not in data, (p.name, needle)
        assert p.stat().st_mode & 0o777 == 0o600, p.name


def test_key_providers(tmp_path, monkeypatch):
    kf = KeyFile.create(tmp_path / "k" / "ledger.key")
    assert len(kf.ledger_key()) == 32
    assert os.stat(kf.path).st_mode & 0o777 == 0o600
    with pytest.raises(LedgerKeyError, match="already exists"):
        KeyFile.create(kf.path)
    os.chmod(kf.path, 0o640)
    with pytest.raises(LedgerKeyError, match="chmod 600"):
        kf.ledger_key()
    monkeypatch.setenv("MARLGRC_LEDGER_KEY", "zz-not-hex-secret")
    with pytest.raises(LedgerKeyError) as exc:
        EnvKey().ledger_key()
    assert "zz-not-hex-secret" not in str(exc.value)
    monkeypatch.setenv("MARLGRC_LEDGER_KEY", KEY.key.hex())
    assert EnvKey().ledger_key() == KEY.key
    assert KEY.key.hex() not in repr(KEY)


def test_erasure_leaves_no_trace_of_the_subject_on_disk(tmp_path):
    led = SqliteLedger(tmp_path / "l.db", KEY, encrypted=True)
    Materializer(led).ingest(RECORDS)
    erase_subject(led, SUBJECT_A, "req-1", "dpo", "GDPR Art. 17")
    # decrypted view: no row anywhere carries the subject's ciphertext or pseudonym in its data
    for (raw,) in led.query("SELECT raw FROM agent_observations"):
        assert SUBJECT_A not in bytes(raw)
    assert (tmp_path / "l.db-wal").stat().st_size == 0   # checkpointed and truncated after the erasure


def test_a_failed_commit_stops_the_ingest_and_nothing_after_it_is_written(tmp_path):
    """Each batch is written (and committed) while the next one is checked: when a COMMIT fails, that
    batch is rolled back, no later batch is written, and a restart from the stored offsets ends with
    exactly what a clean ingest gives. The failure is SQLite's own: the third transaction defers its
    foreign keys and adds a lineage row whose policy update does not exist, so only COMMIT refuses it."""
    from ledger.tables import TABLES

    class FailingCommit(SqliteLedger):
        batches = 0

        def _tail_statements(self, offsets, findings):
            out = super()._tail_statements(offsets, findings)
            type(self).batches += 1
            if type(self).batches == 3:
                orphan = ("no-such-policy-update", 0, "marl.env.state", 0, 0, 1, "c", 0, 1, bytes(32))
                out = [("PRAGMA defer_foreign_keys = ON", [()])] + out + [
                    (self._insert_sql(TABLES["policy_update_lineage"]), [orphan])]
            return out

    led = FailingCommit(tmp_path / "l.db", KEY)
    with pytest.raises(LedgerError, match="FOREIGN KEY constraint failed"):
        Materializer(led).ingest(RECORDS, commit_every=20)
    assert not led.conn.in_transaction
    assert sum(led.offsets().values()) == 40                       # two batches, not the third or later
    stored = sum(led.count(t) for t in ("runs", "environment_states", "agent_observations", "joint_actions",
                                        "di_credit_assignment", "fairness_metrics", "policy_updates",
                                        "audit_checkpoints"))
    assert stored == 40
    stats = Materializer(led).ingest([r for r in RECORDS if r.offset >= led.offsets().get((r.topic, r.partition), 0)],
                                     commit_every=20)
    assert stats.findings == []
    clean = SqliteLedger(tmp_path / "clean.db", KEY)
    Materializer(clean).ingest(RECORDS, commit_every=20)
    assert led.content_hash() == clean.content_hash()
