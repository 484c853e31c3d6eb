"""Every registered algorithm: smoke update, lineage event, determinism, signed checkpoints, resume,
ONNX export. Parametrized over the registry (``learners.algorithms()``)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from eventlog.checkpoint import Signer
from eventlog.codec import default_codec
from eventlog.log import EventLog, MemorySink
from learners import algorithms
from learners.checkpoint import CheckpointError, learner_from_checkpoint, load_checkpoint, save_checkpoint
from learners.export import export_onnx, greedy_module
from learners.lineage import emit_policy_update
from producers.policies import OnnxPolicy, RandomPolicy
from tests.unit.test_learners_support import MatchTarget, harness_run, replay_of

CASES = [(n, c) for n, a in sorted(algorithms().items()) for c in (False, True)
         if (a.continuous_actions if c else a.discrete_actions)]
IDS = [f"{n}-{'continuous' if c else 'discrete'}" for n, c in CASES]


def _config(name, seed=1):
    a = algorithms()[name]
    extra = {"learning_starts": 16, "train_frequency": 2, "hidden_layers": (32,)} if name == "dqn" else {"hidden": 32}
    if name == "qmix":  # 6 episodes of 2 agents x 8 steps: a gradient step per episode from the 4th
        extra = {"learning_starts": 4, "batch_size": 4, "train_frequency": 16, "target_network_frequency": 2,
                 "hidden_layers": (32,), "mixing_embed_dim": 8, "hypernet_embed": 16}
    if name in ("maddpg", "sac"):  # 6 episodes x 7 stored joint transitions of 2 agents: ~10 gradient steps
        extra = {"learning_starts": 16, "batch_size": 16, "train_frequency": 8, "hidden": 32}
    return a.config_cls(seed=seed, **extra)


@pytest.fixture(scope="module")
def replays():
    out = {}
    for cont in (False, True):
        env = MatchTarget(continuous=cont)
        out[cont] = replay_of(harness_run(env, RandomPolicy(env, seed=11), episodes=6, seed=3))
    return out


def _learner(name, cont, replays, seed=1):
    return algorithms()[name].learner_cls(replays[cont].spec, _config(name, seed))


@pytest.mark.parametrize("name,cont", CASES, ids=IDS)
def test_update_emits_policy_update_with_lineage(name, cont, replays):
    rp = replays[cont]
    learner = _learner(name, cont, replays)
    before = learner.weights_sha256()
    parent = learner.version
    out = learner.update(rp)
    assert out["optimizer_steps"] > 0 and learner.weights_sha256() != before and learner.version != parent
    sink = MemorySink()
    ev = emit_policy_update(EventLog(sink, run_id="r1", producer_id="learner"), learner, out, rp, parent_version=parent)
    name_, rec = default_codec().decode(ev.value)
    assert ev.topic == "marl.policy.update" and rec["chain_id"] == f"r1:policy:{name}"
    assert rec["policy_updated"] and rec["optimizer_steps"] == out["optimizer_steps"] and rec["verified"]
    assert rec["weights_sha256"] == learner.weights_sha256() and rec["policy_version"] == learner.version
    assert rec["parent_policy_version"] == parent and rec["config_hash"] == learner.config_hash
    assert {x["chain_id"] for x in rec["lineage"]} >= {"r1:actions", "r1:env", "r1:obs:agent_0", "r1:lifecycle"}
    assert set(rec["source_event_hashes"]) == {x["head_event_hash"] for x in rec["lineage"]}
    assert {m["name"] for m in rec["losses"]}


def test_no_optimizer_step_means_policy_updated_false(replays):
    rp = replays[False]
    learner = _learner("dqn", False, replays)
    learner.config.learning_starts = 10**6  # buffer never full enough: no gradient step
    out = learner.update(rp)
    ev = emit_policy_update(EventLog(MemorySink(), run_id="r1", producer_id="l"), learner, out, rp, parent_version="p")
    assert default_codec().decode(ev.value)[1]["policy_updated"] is False


@pytest.mark.parametrize("name,cont", CASES, ids=IDS)
def test_same_data_seed_and_config_give_bit_identical_weights(name, cont, replays):
    shas = []
    for seed in (1, 1, 2):
        learner = _learner(name, cont, replays, seed)
        learner.update(replays[cont])
        learner.update(replays[cont])
        shas.append(learner.weights_sha256())
    assert shas[0] == shas[1] and shas[0] != shas[2]


@pytest.fixture
def key(tmp_path):
    s = Signer.generate()
    return s


def _private(signer):
    return signer._key  # the test's own throwaway key


@pytest.mark.parametrize("name,cont", CASES, ids=IDS)
def test_checkpoint_round_trip_and_resume_is_exact(name, cont, replays, tmp_path, key):
    rp = replays[cont]
    a = _learner(name, cont, replays)
    a.update(rp)
    meta = save_checkpoint(tmp_path / "ck", a, _private(key))
    for f in ("model_version", "training_date", "training_episodes", "final_average_reward", "final_loss",
              "learning_rate", "gamma", "input_dim", "output_dim", "hidden_layers", "hyperparameters"):
        assert f in meta
    assert meta["weights_sha256"] == a.weights_sha256().hex() and meta["training_episodes"] == 6
    b = learner_from_checkpoint(tmp_path / "ck", key.public_key)
    assert b.weights_sha256() == a.weights_sha256() and b.version == a.version
    a.update(rp)
    b.update(rp)
    assert a.weights_sha256() == b.weights_sha256()  # resume continues exactly (optimizer, RNGs, counters)


def test_modified_checkpoint_is_refused(replays, tmp_path, key):
    a = _learner("mappo", False, replays)
    a.update(replays[False])
    save_checkpoint(tmp_path / "ck", a, _private(key))
    state, _ = load_checkpoint(tmp_path / "ck", key.public_key)
    pt = tmp_path / "ck.pt"
    data = bytearray(pt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pt.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"ck.pt has SHA-256 .* modified after it was signed"):
        load_checkpoint(tmp_path / "ck", key.public_key)
    # metadata edited and re-hashed into the signature file without the key: the signature fails
    pt.write_bytes(bytes(data[:len(data) // 2]) + bytes([data[len(data) // 2] ^ 0xFF]) + bytes(data[len(data) // 2 + 1:]))
    meta = tmp_path / "ck.json"
    meta.write_text(meta.read_text().replace('"gamma": 0.99', '"gamma": 0.5'))
    import hashlib
    sig = json.loads((tmp_path / "ck.sig.json").read_text())
    sig["metadata_sha256"] = hashlib.sha256(meta.read_bytes()).hexdigest()
    (tmp_path / "ck.sig.json").write_text(json.dumps(sig))
    with pytest.raises(CheckpointError, match="signature .* does not verify"):
        load_checkpoint(tmp_path / "ck", key.public_key)
    with pytest.raises(CheckpointError, match="not the trusted key"):
        load_checkpoint(tmp_path / "ck", Signer.generate().public_key)


@pytest.mark.parametrize("name,cont", CASES, ids=IDS)
def test_onnx_policy_equals_torch_on_1000_random_observations(name, cont, replays, tmp_path):
    learner = _learner(name, cont, replays)
    learner.update(replays[cont])
    signer = Signer.generate()
    path = export_onnx(learner, tmp_path / "p.onnx", signer)
    pol = OnnxPolicy(path, signer.public_key)
    spec = learner.spec
    rng = np.random.default_rng(0)
    obs = rng.uniform(-1, 1, (1000, spec.obs_dim)).astype(np.float32)
    ids = np.eye(len(spec.agents), dtype=np.float32)[rng.integers(len(spec.agents), size=1000)]
    x = np.concatenate([obs, ids], 1)
    with torch.no_grad():
        expected = greedy_module(learner)(torch.as_tensor(x)).numpy()
    got = pol.actions(x)  # one batch of 1000 (dynamic batch)
    if spec.discrete:
        assert np.array_equal(got, expected)
    else:
        assert np.allclose(got, expected, atol=1e-5)
    one = pol.act({"agent_1": obs[0]})  # batch of 1 through the Policy protocol
    assert set(one) == {"agent_1"}


def test_the_cli_names_every_registered_algorithm():
    from learners import algorithms
    from marlgrc.commands_learners import ALGO_HELP

    named = {w.strip(" (;") for w in ALGO_HELP.split("(")[0].split("|")}
    assert named == set(algorithms()), ALGO_HELP
