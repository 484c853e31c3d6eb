"""Reproducing a run's updates from its records alone (learners/reproduce.py): for every algorithm a
one-process online run (the one loop, MemoryTransport) retrains to the recorded weights hash of every
update; a gated run with rollbacks and updates every K decisions too; an update that did not come
from its config and events (a corrupted learning rate) is named as the first difference; a tampered
event stops it; a run that records no learner config is refused with what to do instead."""
from __future__ import annotations

import pytest
import torch

from eventlog.checkpoint import Signer
from learners import algorithm
from learners.mappo import MAPPOConfig
from learners.online import MemoryTransport
from learners.replay import ReplayError, UnverifiedStream, records_from_memory
from learners.reproduce import reproduce
from learners.safety import SafetyGate
from marlgrc.training import spec_of, train_on_env
from tests.unit.test_learners_support import MatchTarget
from tests.unit.test_safety_gate import KEY, CorruptedOnce

SIGNER = Signer.from_seed(b"reproduce-test")
SMALL = {"mappo": {"episodes_per_update": 4}, "ippo": {"episodes_per_update": 4},
         "dqn": {"episodes_per_update": 4, "learning_starts": 16, "batch_size": 16, "train_frequency": 8},
         "qmix": {"episodes_per_update": 4, "learning_starts": 4, "batch_size": 4, "train_frequency": 16,
                  "hidden_layers": (16,)},
         "maddpg": {"episodes_per_update": 4, "learning_starts": 16, "batch_size": 16, "train_frequency": 8,
                    "hidden": 16},
         "sac": {"episodes_per_update": 4, "learning_starts": 16, "batch_size": 16, "train_frequency": 8,
                 "hidden": 16}}


def _train(algo: str, continuous: bool, run_id: str, iterations: int = 3, **loop):
    torch.set_num_threads(1)
    transport = MemoryTransport()
    res = train_on_env(MatchTarget(continuous=continuous), "match_target_v0", "0", algo, transport=transport,
                       iterations=iterations, seed=1, run_id=run_id, signer=SIGNER, public_key=SIGNER.public_key,
                       **loop)
    return res, records_from_memory(transport.sink.sent)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("algo,continuous", [("mappo", False), ("mappo", True), ("ippo", False), ("dqn", False),
                                             ("qmix", False), ("maddpg", False), ("maddpg", True), ("sac", True)])
def test_every_update_of_an_online_run_is_retrained_bit_for_bit(algo, continuous):
    config = algorithm(algo).config_cls(seed=1, **SMALL[algo])
    res, records = _train(algo, continuous, f"rep-{algo}-{int(continuous)}", config=config)
    out = reproduce(records, res.run_id, public_key=SIGNER.public_key)
    assert (out.kind, out.algo, out.signatures_checked) == ("online", algo, True)
    assert len(out.checks) == 3 and out.ok, [(c.policy_version, c.recorded.hex()[:8], c.retrained.hex()[:8])
                                             for c in out.checks]
    assert out.learner.weights_sha256() == res.learner.weights_sha256()
    assert out.learner.optimizer_steps == res.learner.optimizer_steps > 0
    assert out.events == len(records)


@pytest.mark.timeout(120)
def test_a_gated_run_with_rollbacks_and_updates_every_k_decisions_is_reproduced(tmp_path):
    """ratio 1.0: any loss on the window refuses the update, so some are rolled back (by the data, not
    by a fault); the reproduction rolls them back too and checks the restored weights."""
    gate = SafetyGate(MatchTarget(), checkpoint=tmp_path / "pre-update", key=KEY, window=50, ratio=1.0)
    res, records = _train("mappo", False, "rep-gated", iterations=6, config=MAPPOConfig(seed=1),
                          gate=gate, decisions_per_update=100)
    assert res.rollback_hashes, "the strict gate refused nothing: the test no longer covers a rollback"
    out = reproduce(records, res.run_id, public_key=SIGNER.public_key)
    assert out.ok and len(out.checks) == 6
    assert sum(c.rolled_back for c in out.checks) == len(res.rollback_hashes)
    assert out.learner.weights_sha256() == res.learner.weights_sha256()


@pytest.mark.timeout(120)
def test_an_update_that_did_not_come_from_its_config_and_events_is_named():
    env = MatchTarget()
    learner = CorruptedOnce(spec_of(env, "rep-corrupt", "match_target_v0", "0", 1),
                            MAPPOConfig(seed=1, learning_rate=3e-3, episodes_per_update=4))
    res, records = _train("mappo", False, "rep-corrupt", iterations=5, learner=learner)
    out = reproduce(records, res.run_id, public_key=SIGNER.public_key)
    assert not out.ok
    assert [c.equal for c in out.checks] == [True, True, True, False, False]   # the 4th, and all after it
    assert out.first_difference is out.checks[3]
    assert out.checks[-1].recorded == res.learner.weights_sha256() != out.learner.weights_sha256()


def test_a_run_updated_on_a_device_this_machine_lacks_is_refused(monkeypatch):
    """A CUDA run reproduces on CUDA only; here its recorded device is given as one no machine has."""
    res, records = _train("mappo", False, "rep-device", iterations=1, config=MAPPOConfig(seed=1, episodes_per_update=4))
    from learners import reproduce as rep

    real = rep._started_config

    def on_gpu(recs, run_id):
        started, cfg = real(recs, run_id)
        return started, cfg | {"learner_config": cfg["learner_config"] | {"device": "cuda:99"}}

    monkeypatch.setattr(rep, "_started_config", on_gpu)
    with pytest.raises(ReplayError, match="updated on 'cuda:99'.*reproduce it on a machine with that device"):
        reproduce(records, res.run_id, public_key=SIGNER.public_key)


def test_a_tampered_event_stops_the_reproduction():
    res, records = _train("mappo", False, "rep-tamper", iterations=2,
                          config=MAPPOConfig(seed=1, episodes_per_update=4))
    i = next(k for k, r in enumerate(records) if r.topic == "marl.joint.action")
    r = records[i]
    records[i] = r._replace(value=r.value[:40] + bytes([r.value[40] ^ 1]) + r.value[41:])
    with pytest.raises(UnverifiedStream, match="failed verification"):
        reproduce(records, res.run_id, public_key=SIGNER.public_key)


def test_a_run_without_a_learner_config_is_refused_with_what_to_do():
    from eventlog.log import EventLog, MemorySink
    from producers.harness import run_episodes
    from producers.policies import RandomPolicy

    sink = MemorySink()
    env = MatchTarget()
    log = EventLog(sink, run_id="rep-random", producer_id="p", signer=SIGNER)
    run_episodes(env, RandomPolicy(env, seed=1), log, episodes=2, seed=1, env_id="match_target_v0",
                 env_version="0", config={})
    log.close()
    with pytest.raises(ReplayError, match="records no learner config.*marlgrc train --run rep-random"):
        reproduce(records_from_memory(sink.sent), "rep-random", public_key=SIGNER.public_key)
    with pytest.raises(ReplayError, match="no run.started"):
        reproduce(records_from_memory(sink.sent), "nope")
