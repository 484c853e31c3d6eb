"""Recorded telemetry (seed 002's JSON Lines): strict validation with a reason per bad line, and the
sandbox_v0 replay of the good ones (producers/telemetry.py)."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from pettingzoo.test import parallel_api_test

from eventlog.codec import default_codec
from eventlog.log import EventLog, MemorySink
from learners.replay import read_records_of_run, records_from_memory
from producers.envs.sandbox_v0 import QUARANTINE_FILE, REWARDS
from producers.harness import run_episodes
from producers.policies import RandomPolicy
from producers.telemetry import (DUPLICATE_STEP, INVALID_JSON, INVALID_TELEMETRY, LABEL_CHANGED, NOT_UTF8, FEATURES,
                                 dead_letter_payload, normalize, parse_telemetry_lines, replay_env, replay_episodes)

SEED_EXAMPLE = {"episode_id": 0, "step": 0, "is_malicious": True, "severity": 0.8, "syscall_count": 150,
                "file_read_count": 20, "file_write_count": 10, "network_connections": 5, "bytes_sent": 5000,
                "bytes_received": 2000, "child_processes": 2, "cpu_usage": 45.5, "memory_usage": 250.0,
                "registry_modification": True, "privilege_escalation_attempt": False, "code_injection_detected": True}


def record(**changes) -> dict:
    return {**SEED_EXAMPLE, **changes}


def lines(*records) -> list[bytes]:
    return [r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode() for r in records]


def recording_file(episodes: int = 3, steps: int = 4) -> list[dict]:
    """Episodes alternating malicious/benign, severity rising with the step."""
    return [record(episode_id=e, step=t, is_malicious=e % 2 == 0, severity=round(0.1 + 0.2 * t, 2),
                   registry_modification=False, code_injection_detected=False)
            for e in range(episodes) for t in range(steps)]


def test_the_seeds_example_is_valid_and_normalizes_as_the_live_env_does():
    parsed = parse_telemetry_lines(lines(SEED_EXAMPLE))
    assert parsed.bad == [] and len(parsed.records) == 1
    line, rec = parsed.records[0]
    assert line == 1 and rec.is_malicious and rec.cpu_usage == 45.5
    assert np.array_equal(normalize(rec.as_json()).vector, normalize(SEED_EXAMPLE).vector)
    assert normalize(rec.as_json()).flags == []


@pytest.mark.parametrize("bad, kind, says", [
    (b"{not json", INVALID_JSON, "line 1: not JSON (key must be a string at column 2)"),
    (b"\xff\xfe{}", NOT_UTF8, "line 1: not UTF-8 text (byte 0)"),
    (b"[1, 2]", INVALID_TELEMETRY, "line 1: not a JSON object but list"),
    (record(cpu_usage=140.5), INVALID_TELEMETRY, "line 1: cpu_usage: input should be less than or equal to 100 "
                                                 "(got 140.5)"),
    (record(syscall_count="150"), INVALID_TELEMETRY, 'syscall_count: input should be a valid integer (got "150")'),
    (record(file_write_count=2.5), INVALID_TELEMETRY, "file_write_count: input should be a valid integer (got 2.5)"),
    (record(registry_modification=1), INVALID_TELEMETRY, "registry_modification: input should be a valid boolean "
                                                         "(got 1)"),
    (record(severity=-0.1), INVALID_TELEMETRY, "severity: input should be greater than or equal to 0"),
    (b'{"episode_id": 0, "step": 0, "severity": NaN}', INVALID_TELEMETRY, "severity: input should be a finite "
                                                                          "number"),
    (record(cpu_usge=3.0), INVALID_TELEMETRY, "cpu_usge: unknown field (seed 002's telemetry has no such field)"),
])
def test_each_bad_line_gets_its_kind_and_a_reason_naming_the_field(bad, kind, says):
    parsed = parse_telemetry_lines(lines(bad))
    assert parsed.records == []
    (b,) = parsed.bad
    assert b.line == 1 and b.kind == kind
    assert says in b.reason, b.reason
    assert "\n" not in b.reason


def test_every_problem_of_a_line_is_named_in_its_one_reason():
    rec = record(step=-1, bytes_sent=None)
    del rec["is_malicious"]
    (b,) = parse_telemetry_lines(lines(rec)).bad
    assert b.reason.startswith("line 1: ")
    for part in ("step: input should be greater than or equal to 0 (got -1)", "is_malicious: missing",
                 "bytes_sent: input should be a valid integer (got null)"):
        assert part in b.reason


def test_cross_line_checks_duplicate_steps_and_changed_labels():
    parsed = parse_telemetry_lines(lines(record(step=0), record(step=1), record(step=1, cpu_usage=3.0),
                                         record(step=2, is_malicious=False), "", record(step=2),
                                         record(sandbox_id="sb-b", step=1, is_malicious=False)))
    assert [n for n, _ in parsed.records] == [1, 2, 6, 7] and parsed.blank == 1 and parsed.lines == 7
    dup, changed = parsed.bad
    assert (dup.line, dup.kind) == (3, DUPLICATE_STEP)
    assert dup.reason == "line 3: episode 0 step 1 was already given on line 2; each step is recorded once"
    assert (changed.line, changed.kind) == (4, LABEL_CHANGED)
    assert "line 4: is_malicious is false but line 1 of episode 0 says true" in changed.reason
    # one recording per (sandbox, episode), records in step order
    recs = parsed.recordings()
    assert [[r.step for r in rec] for rec in recs] == [[0, 1, 2], [1]]
    assert recs[1][0].sandbox_id == "sb-b"


def test_recordings_keep_step_order_and_first_appearance():
    parsed = parse_telemetry_lines(lines(record(episode_id=5, step=2), record(episode_id=3, step=0),
                                         record(episode_id=5, step=0)))
    assert [[(r.episode_id, r.step) for r in rec] for rec in parsed.recordings()] == [[(5, 0), (5, 2)], [(3, 0)]]


def test_a_dead_letter_carries_the_line_exactly_with_its_reason():
    (b,) = parse_telemetry_lines([b"{bad\r\n"]).bad
    p = dead_letter_payload(b, "t.jsonl", "marlgrc-ingest")
    assert p["payload"] == b"{bad" and p["source_offset"] == 1 and p["source_topic"] == "telemetry:t.jsonl"
    assert p["error_kind"] == INVALID_JSON and p["reason"].startswith("line 1: not JSON")
    assert p["payload_sha256"] == hashlib.sha256(b"{bad").digest()


def test_the_replay_env_is_a_parallel_env():
    parsed = parse_telemetry_lines(lines(*recording_file(5, 6)))
    parallel_api_test(replay_env(parsed.recordings(), 2), num_cycles=100)


def test_sandbox_i_observes_its_recording_step_by_step_until_it_ends():
    recs = parse_telemetry_lines(lines(*recording_file(3, 4))).recordings()
    env = replay_env(recs, 2)
    sev = FEATURES.index("severity")
    # episode 0: sandbox_0 <- recording 0 (malicious), sandbox_1 <- recording 1 (benign)
    obs, _ = env.reset(seed=0)
    assert obs["sandbox_0"][sev] == pytest.approx(0.1) and obs["sandbox_1"][sev] == pytest.approx(0.1)
    obs, rew, term, trunc, _ = env.step({"sandbox_0": 0, "sandbox_1": 0})
    assert obs["sandbox_0"][sev] == pytest.approx(0.3)
    assert rew["sandbox_0"] == pytest.approx(-(0.5 + 0.1))       # malicious, uncontained: -(cost + severity)
    assert rew["sandbox_1"] == pytest.approx(REWARDS[0][0])     # benign, monitored
    _, rew, term, _, _ = env.step({"sandbox_0": QUARANTINE_FILE, "sandbox_1": 0})
    assert rew["sandbox_0"] == pytest.approx(REWARDS[QUARANTINE_FILE][1]) and term["sandbox_0"]
    _, _, _, trunc, _ = env.step({"sandbox_1": 0})
    assert not trunc["sandbox_1"]
    _, _, _, trunc, _ = env.step({"sandbox_1": 0})
    assert trunc["sandbox_1"] and env.agents == []               # recording 1 had 4 steps
    # episode 1: recording 2 and, wrapping round, recording 0
    env.reset(seed=1)
    assert [len(r) for r in env._now] == [4, 4] and env._now[1] is env.recordings[0]
    assert replay_episodes(recs, 2) == 2


def test_a_replay_through_the_harness_is_a_run_learners_can_read():
    recs = parse_telemetry_lines(lines(*recording_file(4, 5))).recordings()
    env = replay_env(recs, 2)
    sink = MemorySink()
    log = EventLog(sink, run_id="tel", producer_id="ingest")
    summary = run_episodes(env, RandomPolicy(env, 0), log, episodes=replay_episodes(recs, 2), seed=0,
                           env_id="sandbox_v0", env_version="0", config={"telemetry": "t.jsonl"})
    replay = read_records_of_run(records_from_memory(sink.sent), "tel", allow_unverified=True)
    assert summary.episodes == len(replay.episodes) == 2
    assert replay.spec.agents == ("sandbox_0", "sandbox_1") and replay.spec.obs_dim == 30
    codec = default_codec()
    started = next(codec.decode(v)[1] for t, _, v in sink.sent if t == "marl.run.lifecycle")
    assert started["env_id"] == "sandbox_v0" and json.loads(started["config_json"])["telemetry"] == "t.jsonl"
