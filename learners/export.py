"""ONNX export of a learner's deterministic policy (dynamic batch), signed.

The exported graph maps actor inputs ``[batch, obs_dim + n_agents]`` (observation zero-padded to the
widest agent, then the agent's one-hot index) to the greedy action: the argmax (discrete; int64) or
the Gaussian mean clipped to the action bounds (continuous).

``export_onnx`` writes ``PATH`` and ``PATH.sig.json`` (``eventlog.checkpoint.sign_file``, kind
``onnx-policy``): the file's SHA-256 and size, the run, algorithm, policy version, weights hash and
the ``policy.update`` event of that version (its lineage), the input layout a user of the file needs,
and the signer's key id, signed with Ed25519 by the key ``marlgrc train`` signs its checkpoints with.
The file is used only through ``producers.policies.OnnxPolicy``, which checks all of it before ONNX
Runtime sees a byte (docs/LEARNERS.md, "ONNX export").
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from eventlog.chain import Event
from eventlog.checkpoint import ONNX_POLICY_KIND, Signer, sign_file, signature_path

from .replay import RunSpec

class _Greedy(nn.Module):
    def __init__(self, learner):
        super().__init__()
        self.modules_ = nn.ModuleList(learner.modules())  # keep parameters registered
        self.learner = learner
        spec = learner.spec
        self.clip = not spec.discrete
        if self.clip:
            self.register_buffer("low", torch.as_tensor(spec.action_space.low, dtype=torch.float32))
            self.register_buffer("high", torch.as_tensor(spec.action_space.high, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.learner.greedy(x)
        if self.clip:
            a = torch.maximum(torch.minimum(a, self.high), self.low)
        return a


def greedy_module(learner) -> nn.Module:
    return _Greedy(learner).eval()


def onnx_context(learner, policy_update: Optional[Event] = None, opset: int = 17) -> dict:
    """What an export's signature says about it besides its bytes: where it came from (run, algorithm,
    version, weights hash, the ``policy.update`` event that recorded this version and, through it, the
    events it learned from) and how to call it (``io``: input/output names and the input layout)."""
    spec = learner.spec
    io = {"input": "obs", "output": "action", "agents": list(spec.agents), "obs_dim": spec.obs_dim,
          "discrete": spec.discrete, "action_start": int(spec.action_space.start) if spec.discrete else 0,
          "n_actions": spec.n_actions, "action_shape": [] if spec.discrete else list(spec.action_space.shape),
          "opset": opset}
    update = None
    if policy_update is not None:
        update = {"topic": policy_update.topic, "chain_id": policy_update.chain_id, "seq": policy_update.seq,
                  "event_hash": policy_update.event_hash.hex()}
    return {"run_id": spec.run_id, "env_id": spec.env_id, "env_version": spec.env_version,
            "algorithm": learner.algorithm, "policy_version": learner.version,
            "weights_sha256": learner.weights_sha256().hex(), "config_hash": learner.config_hash,
            "seed": int(learner.config.seed), "optimizer_steps": int(learner.optimizer_steps),
            "policy_update": update, "io": io}


def export_onnx(learner, path: Path, signer: Signer, *, policy_update: Optional[Event] = None,
                opset: int = 17) -> Path:
    """Write the greedy policy to ``path`` and its signature to ``path.sig.json``; returns ``path``.

    ``signer`` is the home's key (``Settings.signing_key``); ``policy_update`` the event that recorded
    this version, when there is one. A signature left from an earlier export is removed first, so a
    failed export never leaves a file that looks signed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    signature_path(path).unlink(missing_ok=True)
    model = greedy_module(learner)
    dummy = torch.zeros(2, learner.spec.obs_dim + len(learner.spec.agents))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter: no onnxscript needed
        torch.onnx.export(model, (dummy,), str(path), input_names=["obs"], output_names=["action"],
                          dynamic_axes={"obs": {0: "batch"}, "action": {0: "batch"}}, opset_version=opset,
                          dynamo=False)
    sign_file(path, signer, ONNX_POLICY_KIND,
              f"{learner.algorithm} policy {learner.version} of run {learner.spec.run_id}",
              onnx_context(learner, policy_update, opset))
    return path


def actor_inputs(spec: RunSpec, observations) -> tuple[list[str], np.ndarray]:
    live = [a for a in spec.agents if a in observations]
    x = np.zeros((len(live), spec.obs_dim + len(spec.agents)), np.float32)
    for j, a in enumerate(live):
        o = np.asarray(observations[a], np.float32).ravel()
        x[j, :o.shape[0]] = o
        x[j, spec.obs_dim + spec.agents.index(a)] = 1.0
    return live, x
