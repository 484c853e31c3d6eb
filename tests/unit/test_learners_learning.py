"""Learning tests: each algorithm, trained on-policy through the event log (harness -> sealed events
-> verified replay -> update), beats a random policy on MatchTarget by a clear margin. Fixed seeds,
small budgets (a few thousand agent-steps each)."""
from __future__ import annotations

import pytest

from learners import algorithm
from learners.evaluate import evaluate
from learners.online import MemoryTransport
from marlgrc.training import train_on_env
from producers.policies import RandomPolicy
from tests.unit.test_learners_support import MatchTarget

CASES = {
    "mappo": (False, dict(learning_rate=3e-3), 8),
    "ippo": (False, dict(learning_rate=3e-3), 8),
    "mappo-continuous": (True, dict(learning_rate=3e-3), 12),
    "dqn": (False, dict(learning_rate=1e-3, learning_starts=200, train_frequency=2, target_network_frequency=100,
                        e_decay=0.9, hidden_layers=(64,)), 8),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", sorted(CASES))
def test_learns_match_target_well_above_random(case):
    name = case.split("-")[0]
    continuous, overrides, iterations = CASES[case]
    env = MatchTarget(continuous=continuous)
    cfg = algorithm(name).config_cls(seed=1, episodes_per_update=10, **overrides)
    res = train_on_env(env, "match_target_v0", "0", name, transport=MemoryTransport(), iterations=iterations,
                       seed=1, config=cfg)
    random_return = evaluate(env, RandomPolicy(env, seed=999), 50, 5000)
    if name == "dqn":
        res.learner.episodes = 10**6  # evaluate at the final epsilon (0.1), not the training one
    trained = evaluate(env, res.learner, 50, 5000)
    # MatchTarget, 2 agents x 8 steps: random scores ~5.3 (discrete, optimum 16) or ~-10.5 (continuous, optimum 0)
    margin = 4.0
    assert trained > random_return + margin, (case, random_return, trained, res.curve)
    assert all(u > 0 for u in [r["optimizer_steps"] for r in res.curve[-1:]])


def _loop(transport, signer=None, iterations=3):
    """The learners' loop on its own, with a collect that is the harness bound to MatchTarget."""
    from learners.online import train_online
    from marlgrc.training import spec_of
    from producers.harness import run_episodes

    env = MatchTarget()

    def collect(policy, log, *, episodes, seed, config):
        run_episodes(env, policy, log, episodes=episodes, seed=seed, env_id="match_target_v0", env_version="0",
                     config=config)

    cfg = algorithm("mappo").config_cls(seed=4, episodes_per_update=3)
    return train_online(spec_of(env, "loop1", "match_target_v0", "0", 4), "mappo", collect=collect,
                        transport=transport, iterations=iterations, seed=4, config=cfg, signer=signer,
                        public_key=signer.public_key if signer else None)


def test_a_training_session_signs_every_chain_it_writes():
    from eventlog.checkpoint import Signer
    from eventlog.verify import verify_records
    from learners.replay import records_from_memory

    signer = Signer.from_seed(b"loop-test")
    transport = MemoryTransport()
    res = _loop(transport, signer)
    report = verify_records(records_from_memory(transport.sink.sent), signer.public_key)
    assert report.ok, [b.describe() for b in report.breaks]
    data = [c for c in report.chains if c.topic != "marl.audit.checkpoints"]
    # the harness's chains and the learner's policy chain, each signed through its last event
    assert {c.chain_id for c in data} >= {"loop1:actions", "loop1:env", "loop1:lifecycle", "loop1:policy:mappo"}
    assert all(c.signed_through_seq == c.last_seq >= 0 for c in data), [(c.chain_id, c.last_seq,
                                                                        c.signed_through_seq) for c in data]
    assert len(res.update_hashes) == 3


def test_memory_transport_without_keep_drops_what_was_read_and_trains_the_same():
    kept, dropped = MemoryTransport(), MemoryTransport(keep=False)
    a, b = _loop(kept), _loop(dropped)
    assert a.learner.weights_sha256() == b.learner.weights_sha256()
    assert [r["env_steps"] for r in a.curve] == [r["env_steps"] for r in b.curve] == [24, 48, 72]
    # what is left is the last update's policy.update (written after the last read)
    assert len(dropped.sink.sent) < 5 < len(kept.sink.sent)
    assert dropped.mark() == kept.mark()
    with pytest.raises(ValueError, match="move forward"):
        dropped.read(0, 1)


def test_train_online_command_writes_a_curve_and_a_checkpoint_signed_with_the_home_key(tmp_path):
    import json

    from typer.testing import CliRunner

    from eventlog.checkpoint import Signer
    from learners.checkpoint import CheckpointError, load_checkpoint
    from marlgrc.cli import app

    home, curve = tmp_path / "home", tmp_path / "curves" / "c.json"
    res = CliRunner().invoke(app, ["train-online", "--env", "tests.unit.test_learners_support:MatchTarget",
                                   "--algo", "mappo", "--iterations", "2", "--bootstrap", "memory", "--set",
                                   "episodes_per_update=3", "--eval-episodes", "4", "--out", str(curve),
                                   "--checkpoint", str(tmp_path / "ck"), "--home", str(home)])
    assert res.exit_code == 0, res.output
    data = json.loads(curve.read_text())
    assert data["transport"] == "memory" and data["config"]["episodes_per_update"] == 3
    assert [r["env_steps"] for r in data["curve"]] == [24, 48]
    assert set(data["policies"]) == {"random", "learned (sampled)", "learned (greedy)"}
    assert data["random_return"] == data["policies"]["random"]["mean_return"]
    run_id = res.stdout.strip().splitlines()[-1]
    assert run_id.startswith("test_learners_support__mappo__1__")
    assert load_checkpoint(tmp_path / "ck", Signer.load(home / "keys" / "signing.pem").public_key)
    with pytest.raises(CheckpointError, match="not the trusted key"):
        load_checkpoint(tmp_path / "ck", Signer.generate().public_key)


def test_train_online_command_errors_are_one_line(tmp_path):
    from typer.testing import CliRunner

    from marlgrc.cli import app

    common = ["--bootstrap", "memory", "--home", str(tmp_path), "--iterations", "1"]
    for args, says in ((["--env", "no_such_env_v1"], "neither a built-in env"),
                       (["--algo", "a2c"], "unknown algorithm"),
                       (["--set", "no_field=1"], "has no field 'no_field'"),
                       (["--set", "update_epochs=many"], "--set update_epochs=many: Input should be a valid integer"),
                       (["--set", "norm_adv=maybe"], "--set norm_adv=maybe: Input should be a valid boolean"),
                       (["--env-arg", "fair_reward"], "--env-arg 'fair_reward' must look like name=value")):
        res = CliRunner().invoke(app, ["train-online", *args, *common])
        assert res.exit_code == 2, (args, res.output)
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], (args, res.output)
