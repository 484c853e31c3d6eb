"""The harness's batched sealing (producers/harness.py) gives the bytes of sealing each step, and
batched subject keys (eventlog/privacy.py) the keys of single look-ups."""
import pytest

import producers.harness as harness
from eventlog.codec import default_codec
from eventlog.kafka import Record
from eventlog.log import EventLog, MemorySink
from eventlog.privacy import FieldProtector, LocalKeyStore, PrivacyError
from eventlog.verify import verify_records
from producers.envs import mailbox_v0
from producers.policies import RandomPolicy
from tests.unit.test_chain_writer import SIGNER, deterministic_log

CODEC = default_codec()

LAST_SINK: list[MemorySink] = []  # the sink of the last harness_run, also when it raised


def harness_run(env_factory, monkeypatch, batch, checkpoint_every=10_000, protector=None, episodes=2,
                micros=1 << 60):
    """A run with a deterministic clock (1013 µs a reading) sealing every ``batch`` steps or ``micros``."""
    monkeypatch.setattr(harness, "SEAL_BATCH_STEPS", batch)
    monkeypatch.setattr(harness, "SEAL_BATCH_MICROS", micros)
    sink = MemorySink()
    LAST_SINK[:] = [sink]
    log = deterministic_log(sink, checkpoint_every)
    env = env_factory()
    summary = harness.run_episodes(env, RandomPolicy(env, seed=4), log, episodes=episodes, seed=7, env_id="e",
                                   env_version="0", config={}, protector=protector)
    log.close()
    return sink, summary


class NamesNoSubject:
    """An env with ``subject_fields`` that names no one: the harness seals its steps in batches, as
    for any env with personal data, and writes ``protected_fields`` empty (the schema's default)."""

    def __init__(self, env):
        self._env = env

    def __getattr__(self, name):
        return getattr(self._env, name)

    def subject_fields(self, agent):
        return []


def test_harness_batches_give_the_bytes_of_sealing_each_step(monkeypatch, tmp_path):
    from mpe2 import simple_spread_v3

    def env():
        return simple_spread_v3.parallel_env(N=3, max_cycles=20, local_ratio=0.5)

    def deferred():
        return NamesNoSubject(env())
    keys = LocalKeyStore(tmp_path / "k.db", key=bytes(32))
    now, s0 = harness_run(env, monkeypatch, 7)  # no personal data: each event sealed as it happens
    one, s1 = harness_run(deferred, monkeypatch, 1, protector=FieldProtector(keys))
    many, s2 = harness_run(deferred, monkeypatch, 7, protector=FieldProtector(keys))
    timed, _ = harness_run(deferred, monkeypatch, 64, micros=12_000, protector=FieldProtector(keys))  # ~2 steps
    keys.close()
    assert s0.events == s1.events == s2.events == 1 + 2 * 20 * 5 + 2 + 1  # + an episode.summary per episode
    # a checkpoint per chain (lifecycle, env, 3 obs, actions), then the checkpoint chain's own
    assert len(one.sent) == s1.events + 7
    assert now.sent == one.sent == many.sent == timed.sent
    for _, _, value in many.sent:  # each value is the canonical Avro of its record
        name, rec = CODEC.decode(value)
        assert CODEC.encode(name, rec) == value


def test_harness_batches_protect_with_the_right_seq(tmp_path, monkeypatch):
    keys = LocalKeyStore(tmp_path / "k.db", key=bytes(32))
    protector = FieldProtector(keys)
    sink, summary = harness_run(mailbox_v0.parallel_env, monkeypatch, 6, checkpoint_every=5,
                                protector=protector, episodes=3)
    assert summary.steps == 60
    revealed = 0
    for _, chain, value in sink.sent:
        rec = CODEC.decode(value)[1]
        for field in rec.get("protected_fields", []):
            assert protector.reveal(chain, rec["seq"], field)  # AAD binds chain and seq: wrong seq fails
            revealed += 1
    assert revealed == 60 * 8
    report = verify_records([Record(t, 0, i, k, v, 0) for i, (t, k, v) in enumerate(sink.sent)], SIGNER.public_key)
    assert report.ok, [b.describe() for b in report.breaks]
    keys.close()


def test_subject_keys_batch_matches_single_lookups_and_survives_reopen(tmp_path):
    store = LocalKeyStore(tmp_path / "k.db", key=bytes(32))
    known = store.subject_key("user", "u0")
    subjects = [("user", f"u{i}") for i in range(1200)] + [("sender", "u0"), ("user", "u5")]
    keys = store.subject_keys(subjects)
    assert keys[0] == known and keys[5] == keys[-1] and keys[1200] != known
    assert len(set(keys[:1201])) == 1201
    store.close()
    again = LocalKeyStore(tmp_path / "k.db", key=bytes(32))
    assert [again.subject_key(ns, raw, create=False) for ns, raw in subjects] == keys
    assert again.subjects() == 1201
    again.close()


def test_failed_step_still_seals_what_was_captured():
    from mpe2 import simple_spread_v3

    class BreaksAtStep3(RandomPolicy):
        calls = 0

        def act(self, observations, state=None):
            self.calls += 1
            return {} if self.calls == 4 else super().act(observations, state)

    env = simple_spread_v3.parallel_env(N=3, max_cycles=10, local_ratio=0.5)
    sink = MemorySink()
    log = EventLog(sink, run_id="r", producer_id="p")
    with pytest.raises(harness.HarnessError, match="gave no action"):
        harness.run_episodes(env, BreaksAtStep3(env, seed=0), log, episodes=1, seed=0, env_id="x", env_version="0",
                             config={})
    types = [CODEC.decode(v)[1]["event_type"] for _, _, v in sink.sent]
    step = ["env.state"] + ["agent.observation"] * 3
    assert types == ["run.started"] + (step + ["joint.action"]) * 3 + step + ["run.finished"]


class FailingKeys:
    """A key provider (no batch method) that cannot create more than ``limit`` subjects."""

    def __init__(self, store, limit):
        self.store, self.created, self.limit = store, 0, limit

    def subject_key(self, namespace, raw_id, *, create=True):
        key = self.store.subject_key(namespace, raw_id, create=False)
        if key is None:
            if self.created == self.limit:
                raise PrivacyError("key store unavailable")
            self.created += 1
            key = self.store.subject_key(namespace, raw_id)
        return key

    def key_for_ref(self, namespace, subject_ref):
        return self.store.key_for_ref(namespace, subject_ref)

    def shred(self, namespace, raw_id):
        return self.store.shred(namespace, raw_id)


@pytest.mark.parametrize("limit", [6, 7, 9])
def test_key_failure_in_a_batch_seals_what_came_before_it(tmp_path, monkeypatch, limit):
    """As when each step was sealed at once: the events before the failing one are written, then
    run.finished (failed); batches of 1 (each step at once) and of 8 steps write the same events."""
    runs = []
    for batch in (1, 8):
        store = LocalKeyStore(tmp_path / f"k{batch}.db", key=bytes(32))
        with pytest.raises(PrivacyError, match="unavailable"):
            harness_run(mailbox_v0.parallel_env, monkeypatch, batch,
                        protector=FieldProtector(FailingKeys(store, limit)))
        runs.append([(k, CODEC.decode(v)[1]["event_type"]) for _, k, v in LAST_SINK[0].sent])
        store.close()
    assert runs[0] == runs[1]
    assert runs[0][-1] == ("r:lifecycle", "run.finished") and ("r:actions", "joint.action") in runs[0]
    finished = CODEC.decode(LAST_SINK[0].sent[-1][2])[1]
    assert (finished["status"], finished["reason"]) == ("failed", "PrivacyError")
