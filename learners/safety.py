"""The safety gate of online learning (seed 001, Innovation #4 "Online Learning with Safety").

Seed 001's protocol: monitor performance over the recent 100 actions, compare with a baseline and
don't degrade below 80% of it, update only every 1000 experiences, save a checkpoint before each
update to roll back to, export experience for offline retraining. With the one training loop
(``learners.online.train_online(..., gate=SafetyGate(...), decisions_per_update=K)``) it reads:

- **experience / decision**: one agent's action at one step, i.e. one entry of a ``joint.action``'s
  ``actions``. The loop updates once at least K decisions were read back (whole episodes).
- **checkpoint**: before every update, ``learners.checkpoint.save_checkpoint`` writes the learner's
  full training state, signed with the home's Ed25519 key (``SafetyGate.before_update``).
- **the recent window**: the last ``window`` decisions of the batch the update learned from
  (``recent_window``), taken from its ``joint.action`` events in chain order. The policy that took
  them is the one checkpointed before the update: the deployed policy.
- **baseline**: the mean env reward per decision over the window (``actions[].reward``: what the env
  paid, not the decision interpreter's credit shares), read from those events.
- **candidate**: the same measure for the updated policy, measured on the same situations: a copy of
  it (so the learner's own sampling stream is untouched) acts, as it would when deployed, in the
  window's episodes again, each reset with the seed the harness reset it with (its batch's
  ``run.started`` seed + the episode number), without writing events; its score is the mean reward of
  its last ``len(window)`` decisions over those episodes (``candidate_score``). With episodes of a
  fixed length these are the window's very (episode, step, agent) slots. A candidate that raises while
  acting, or whose weights are not finite, scores -inf.
- **the 80% rule** (``threshold``/``passes``): accept iff ``candidate >= baseline - (1 - ratio) *
  |baseline|``. For a positive baseline this is ``candidate >= ratio * baseline`` (seed 001's
  "80% of baseline"); for a negative one it is ``candidate >= (2 - ratio) * baseline``: the candidate
  may lose at most 20% of the baseline's magnitude (a naive ``0.8 * baseline`` would be *above* a
  negative baseline and refuse every update that does not improve); for a zero baseline, any loss
  is refused. Exactly at the threshold is accepted ("falls below" refuses).
- **rollback** (``SafetyGate.judge``): the checkpoint is loaded back through ``load_checkpoint``
  (digests and signature checked first), the learner's whole training state is restored from it
  (weights, optimizer, RNG streams, replay buffer, update counter and so version) and its weights hash
  is checked against the checkpoint's; only the counts of experience acted (``env_steps``,
  ``episodes``) keep counting, since those decisions happened and are on the topics. The loop then
  appends ``policy.rollback`` (``emit_policy_rollback``) on the policy chain, after the
  ``policy.update`` that recorded the refused update.

Pure parts: ``threshold``, ``passes``, ``recent_window``, ``candidate_score``. ``decision_rewards``
runs an env handed in (duck-typed, as ``learners.evaluate`` does: learners never import producers).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from eventlog.chain import Event
from eventlog.codec import Codec, default_codec
from eventlog.kafka import Record
from eventlog.log import EventLog

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .lineage import policy_chain
from .replay import LineageRange, ReplayError

ACTION_TOPIC = "marl.joint.action"
LIFECYCLE_TOPIC = "marl.run.lifecycle"
DEFAULT_WINDOW = 100      # seed 001: "Performance Monitoring (recent 100 actions)"
DEFAULT_RATIO = 0.8       # seed 001: "safety_threshold = 0.8"
DEFAULT_UPDATE_EVERY = 1000  # seed 001: "Gradual Updates (every 1000 experiences)"


@dataclass(frozen=True)
class GateConfig:
    """Online learning's settings (`marlgrc run --online`)."""

    update_every: int = DEFAULT_UPDATE_EVERY
    """agent decisions (experiences) read back between updates, rounded up to whole episodes"""
    window: int = DEFAULT_WINDOW
    """the recent window: the last decisions an update is judged on"""
    ratio: float = DEFAULT_RATIO
    """the 80% rule's ratio: refuse an update scoring below baseline - (1 - ratio) * |baseline|"""


# --- the rule ------------------------------------------------------------------------------------
def threshold(baseline: float, ratio: float = DEFAULT_RATIO) -> float:
    """The lowest acceptable candidate score: ``baseline - (1 - ratio) * |baseline|``, computed as
    ``ratio * baseline`` (baseline >= 0) or ``(2 - ratio) * baseline`` (baseline < 0), the same value
    without the rounding of ``1 - ratio``. Requires ``0 < ratio <= 1``."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"gate ratio {ratio} is outside (0, 1]; seed 001 uses 0.8 (refuse below 80% of the "
                         f"baseline)")
    return ratio * baseline if baseline >= 0 else (2.0 - ratio) * baseline


def passes(candidate: float, baseline: float, ratio: float = DEFAULT_RATIO) -> bool:
    """Whether the updated policy's score keeps it: ``candidate >= threshold(baseline, ratio)``.
    A NaN candidate (or baseline) never passes."""
    return candidate >= threshold(baseline, ratio)


# --- the window ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """The recent window: the last decisions of a batch, with where they came from."""

    rewards: tuple[float, ...]               # env reward of each decision, oldest first
    reset_seeds: tuple[int, ...]             # seeds the window's episodes were reset with, oldest first
    lineage: tuple[LineageRange, ...]        # the joint.action events holding the decisions

    def __len__(self) -> int:
        return len(self.rewards)

    @property
    def baseline(self) -> float:
        """Mean reward per decision of the policy that took them (NaN for an empty window)."""
        return sum(self.rewards) / len(self.rewards) if self.rewards else float("nan")


def recent_window(records: Iterable[Record], run_id: str, size: int = DEFAULT_WINDOW,
                  codec: Codec | None = None) -> Window:
    """The last ``size`` decisions of run ``run_id`` among ``records`` (a batch, or the batches of one
    update, as read back: each chain in offset order), or all of them when there are fewer.

    Decisions are ordered by the ``{run}:actions`` chain, and within a joint action as it lists them.
    An episode is identified by the ``producer_id`` of its events (one per batch) and its episode
    number; its reset seed is that producer's ``run.started`` seed + the episode number (the harness
    resets episode ``i`` with ``seed + i``), so the records must hold the run.started of every batch
    the window reaches into."""
    if size < 1:
        raise ValueError(f"the gate's window must hold at least one decision, got {size}")
    codec = codec or default_codec()
    prefix = f"{run_id}:"
    actions: list[Record] = []
    seeds: dict[str, int] = {}
    for r in records:
        if not r.key.startswith(prefix):
            continue
        if r.topic == ACTION_TOPIC:
            actions.append(r)
        elif r.topic == LIFECYCLE_TOPIC:
            name, rec = codec.decode(r.value)
            if name == "run_started":
                seeds[rec["producer_id"]] = int(rec["seed"])
    picked: list[tuple[Record, dict, list[float]]] = []   # newest first
    n = 0
    for r in reversed(actions):
        _, rec = codec.decode(r.value)
        rewards = [float(a["reward"]) for a in rec["actions"]]
        take = rewards[max(0, len(rewards) - (size - n)):]
        picked.append((r, rec, take))
        n += len(take)
        if n >= size:
            break
    picked.reverse()
    episodes: list[tuple[str, int]] = []
    ranges: dict[tuple[str, int, str], list] = {}
    for r, rec, _ in picked:
        ep = (rec["producer_id"], int(rec["episode"]))
        if not episodes or episodes[-1] != ep:
            episodes.append(ep)
        k = (r.topic, r.partition, r.key)
        row = ranges.get(k)
        if row is None:
            ranges[k] = [r.offset, r.offset, rec["seq"], rec["seq"], bytes(r.value[-32:])]
        else:
            row[1], row[3], row[4] = r.offset, rec["seq"], bytes(r.value[-32:])
    missing = sorted({p for p, _ in episodes} - set(seeds))
    if missing:
        raise ReplayError(f"run {run_id}: the gate's window reaches into batches whose run.started was not read "
                          f"(producer ids {missing}), so their episodes' reset seeds are unknown; read each batch "
                          f"from its start")
    lineage = [LineageRange(t, p, a, b, c, s0, s1, h) for (t, p, c), (a, b, s0, s1, h) in sorted(ranges.items())]
    return Window(tuple(x for _, _, take in picked for x in take), tuple(seeds[p] + e for p, e in episodes),
                  tuple(lineage))


def candidate_score(episode_rewards: Sequence[Sequence[float]], n: int) -> float:
    """Mean of the last ``n`` decision rewards over the episodes, in order (NaN when there are none)."""
    flat = [x for ep in episode_rewards for x in ep]
    last = flat[-n:] if n > 0 else []
    return sum(last) / len(last) if last else float("nan")


def decision_rewards(env: Any, policy: Any, seeds: Sequence[int], max_steps: int | None = None) -> list[list[float]]:
    """Run ``policy`` in ``env`` for one episode per seed (reset with it), writing no events; each
    episode's rewards per decision, in the order the harness writes them into joint.action (steps in
    order; within a step the live agents in ``env.agents`` order). ``max_steps`` caps an episode as
    the harness's does."""
    out = []
    for s in seeds:
        obs, _ = env.reset(seed=int(s))
        rewards: list[float] = []
        step = 0
        while env.agents:
            live = [a for a in env.agents if a in obs]
            chosen = policy.act(obs if len(live) == len(obs) else {a: obs[a] for a in live})
            obs, rew, _, _, _ = env.step({a: chosen[a][0] for a in live})
            rewards.extend(float(rew.get(a, 0.0)) for a in live)
            step += 1
            if max_steps is not None and step >= max_steps:
                break
        out.append(rewards)
    return out


# --- the gate ------------------------------------------------------------------------------------
@dataclass
class Verdict:
    """What the gate decided about one update."""

    accepted: bool
    baseline: float
    candidate: float
    threshold: float
    ratio: float
    window: Window
    candidate_version: str
    candidate_weights: bytes
    reason: str
    restored_version: str = ""               # set on a rollback
    checkpoint_weights: bytes = b""          # set on a rollback: the restored weights' hash

    def row(self) -> dict:
        """The verdict's numbers for a learning-curve row."""
        return {"gate": "accepted" if self.accepted else "rolled back", "gate_baseline": self.baseline,
                "gate_candidate": self.candidate, "gate_threshold": self.threshold}


def _finite(learner: Any) -> bool:
    return all(bool(torch.isfinite(t).all()) for m in learner.modules() for t in m.state_dict().values()
               if torch.is_tensor(t) and t.is_floating_point())


@dataclass
class SafetyGate:
    """Checkpoint before each update; judge it on the recent window after; roll back a refused one.

    ``env``: an instance of the run's env, used only to re-run the window's episodes for the updated
    policy (no events; give it one of its own, not the one the harness collects with). ``checkpoint``:
    where the pre-update checkpoint is written (``NAME.pt``, ``NAME.json``, ``NAME.sig.json``; each
    update overwrites the last one). ``key``: the Ed25519 private key that signs it (the home's,
    ``learners.checkpoint.load_signing_key``); a rollback loads it back with its public key.
    """

    env: Any
    checkpoint: Path
    key: Any
    window: int = DEFAULT_WINDOW
    ratio: float = DEFAULT_RATIO
    max_steps: int | None = None
    verdicts: list[Verdict] = field(default_factory=list)

    def __post_init__(self) -> None:
        threshold(0.0, self.ratio)  # refuses a ratio outside (0, 1] now, not after the first update
        if self.window < 1:
            raise ValueError(f"the gate's window must hold at least one decision, got {self.window}")

    def before_update(self, learner: Any) -> dict:
        """Write the signed checkpoint of the deployed policy; returns its metadata."""
        return save_checkpoint(self.checkpoint, learner, self.key)

    def judge(self, learner: Any, records: Iterable[Record]) -> Verdict:
        """Score the updated ``learner`` on the recent window of ``records`` (the update's batches as
        read back); refused -> restore the checkpoint into ``learner``. Returns the verdict."""
        window = recent_window(records, learner.spec.run_id, self.window)
        version, weights = learner.version, learner.weights_sha256()
        base = window.baseline
        if not len(window):
            v = Verdict(True, base, float("nan"), float("nan"), self.ratio, window, version, weights,
                        "no decisions in the batch: nothing to judge")
            self.verdicts.append(v)
            return v
        limit = threshold(base, self.ratio)
        score, why = self._score(learner, window)
        accepted = passes(score, base, self.ratio)
        reason = why or (f"mean reward per decision {score:.6g} {'>=' if accepted else '<'} threshold {limit:.6g} "
                         f"(baseline {base:.6g} over the last {len(window)} decisions, ratio {self.ratio})")
        v = Verdict(accepted, base, score, limit, self.ratio, window, version, weights, reason)
        if not accepted:
            v.restored_version, v.checkpoint_weights = self.restore(learner)
        self.verdicts.append(v)
        return v

    def _score(self, learner: Any, window: Window) -> tuple[float, str]:
        if not _finite(learner):
            return -math.inf, "the updated weights are not finite"
        candidate = copy.deepcopy(learner)  # acts with a copy of the sampling stream: the learner's is untouched
        try:
            rewards = decision_rewards(self.env, candidate, window.reset_seeds, self.max_steps)
        except Exception as exc:  # noqa: BLE001 - the deployed policy ran these episodes: the candidate failed
            return -math.inf, f"the updated policy failed while acting on the window: {type(exc).__name__}: {exc}"
        return candidate_score(rewards, len(window)), ""

    def restore(self, learner: Any) -> tuple[str, bytes]:
        """Load the signed checkpoint back into ``learner`` (everything but the experience counters);
        returns the restored version and weights hash, checked against the checkpoint's metadata."""
        state, meta = load_checkpoint(self.checkpoint, self.key.public_key())
        acted = learner.env_steps, learner.episodes
        learner.load_state_dict(state)
        learner.env_steps, learner.episodes = acted
        got = learner.weights_sha256()
        if got.hex() != meta["weights_sha256"]:
            raise CheckpointError(f"checkpoint {self.checkpoint}: restored weights hash to {got.hex()[:16]}…, the "
                                  f"checkpoint says {meta['weights_sha256'][:16]}…; the rollback did not restore it")
        return learner.version, got


def emit_policy_rollback(log: EventLog, learner: Any, verdict: Verdict, rejected: Event) -> Event:
    """Append ``policy.rollback`` on ``{run}:policy:{algo}`` after the refused update's ``policy.update``
    (``rejected``). Header ``policy_version`` = the restored version; ``source_event_hashes`` = the
    refused policy.update's hash, then the window's head hashes."""
    w = verdict.window
    return log.append(policy_chain(learner.spec.run_id, learner.algorithm), "policy.rollback", {
        "algorithm": learner.algorithm,
        "rejected_policy_version": verdict.candidate_version,
        "rejected_weights_sha256": verdict.candidate_weights,
        "rejected_update_event_hash": rejected.event_hash,
        "restored_policy_version": verdict.restored_version,
        "checkpoint_weights_sha256": verdict.checkpoint_weights,
        "baseline": float(verdict.baseline),
        "candidate": float(verdict.candidate),
        "threshold": float(verdict.threshold),
        "gate_ratio": float(verdict.ratio),
        "window_decisions": len(w),
        "window_reset_seeds": [int(s) for s in w.reset_seeds],
        "reason": verdict.reason,
        "lineage": [r.to_record() for r in w.lineage],
    }, policy_version=verdict.restored_version,
        source_event_hashes=[rejected.event_hash, *(r.head_event_hash for r in w.lineage)])
