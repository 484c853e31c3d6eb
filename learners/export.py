"""ONNX export of a learner's deterministic policy (dynamic batch) and an ONNX Runtime policy.

The exported graph maps actor inputs ``[batch, obs_dim + n_agents]`` (observation zero-padded to the
widest agent, then the agent's one-hot index) to the greedy action: the argmax (discrete; int64) or
the Gaussian mean clipped to the action bounds (continuous).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

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


def export_onnx(learner, path: Path, opset: int = 17) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = greedy_module(learner)
    dummy = torch.zeros(2, learner.spec.obs_dim + len(learner.spec.agents))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter: no onnxscript needed
        torch.onnx.export(model, (dummy,), str(path), input_names=["obs"], output_names=["action"],
                          dynamic_axes={"obs": {0: "batch"}, "action": {0: "batch"}}, opset_version=opset,
                          dynamo=False)
    return path


def actor_inputs(spec: RunSpec, observations) -> tuple[list[str], np.ndarray]:
    live = [a for a in spec.agents if a in observations]
    x = np.zeros((len(live), spec.obs_dim + len(spec.agents)), np.float32)
    for j, a in enumerate(live):
        o = np.asarray(observations[a], np.float32).ravel()
        x[j, :o.shape[0]] = o
        x[j, spec.obs_dim + spec.agents.index(a)] = 1.0
    return live, x


class OnnxPolicy:
    """The Policy protocol over an exported model: one ONNX Runtime call per joint decision."""

    def __init__(self, path: Path, spec: RunSpec, version: str):
        import onnxruntime as ort

        # one decision is a few small matmuls: run them on the caller's thread, in order, with no
        # thread pool to wake (or spin) and every graph optimization applied
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self._out = [self.session.get_outputs()[0].name]
        self.spec = spec
        self.version = version

    def actions(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(self._out, {"obs": x})[0]

    def act(self, observations, state=None) -> dict:
        live, x = actor_inputs(self.spec, observations)
        out = self.actions(x)
        start = self.spec.action_space.start if self.spec.discrete else 0
        if self.spec.discrete:
            return {a: (int(out[j]) + start, 0.0) for j, a in enumerate(live)}
        return {a: (out[j], 0.0) for j, a in enumerate(live)}
