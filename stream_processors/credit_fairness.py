"""Fairness metrics from ``di.credit`` events alone (one input topic), pure and restartable.

This is the logic of the faust-streaming app (``faust_fairness.py``); it is kept free of faust and
Kafka so that it is unit-tested directly. Per credit chain (``{run}:credit``) one ``ChainState``
holds the last input offset processed (idempotency: an input at or below it is skipped), the two
output chain heads and the fairness tallies; it serializes to a few KB.

Outputs, per input credit event, at most ONE event per output chain (faust publishes the messages
attached to one input record in no fixed order, so two events of one chain from one input could
land out of order):

- ``{run}:fairness:faust:episode``: an episode's metrics, emitted when the next episode's first
  credit arrives (a credit event does not say whether the episode ended; the DI worker's own
  ``{run}:fairness`` chain also closes an episode on all-done);
- ``{run}:fairness:faust:sliding``: the last ``window`` credits, every ``hop`` credits.

Mapping onto seed 001 (differs from the DI worker's only in *bids*): an agent *bids* in a step
when its share is non-zero or it was penalized (the joint action's own actions are not in a credit
event).
"""
from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import Mapping

from eventlog.chain import ChainHead

from . import fairness as fair

VERSION = "fairness-from-credit/1"
WINDOW, HOP = 100, 25


class InvalidCredit(ValueError):
    """A di.credit record that cannot be scored (goes to the dead-letter topic)."""


@dataclass
class ChainState:
    last_offset: int = -1
    episode_head: ChainHead = field(default_factory=ChainHead)
    sliding_head: ChainHead = field(default_factory=ChainHead)
    episode: int | None = None
    ep_tally: fair.Tally = field(default_factory=fair.Tally)
    ep_hashes: list = field(default_factory=list)     # [first, last] credit hash hex of the episode
    ep_rule: str = ""
    window: deque = field(default_factory=deque)      # [outcome json, credit hash hex]
    credits: int = 0

    def to_bytes(self) -> bytes:
        return json.dumps({
            "last_offset": self.last_offset,
            "episode_head": [self.episode_head.seq, self.episode_head.event_hash.hex()],
            "sliding_head": [self.sliding_head.seq, self.sliding_head.event_hash.hex()],
            "episode": self.episode, "ep_tally": self.ep_tally.to_json(), "ep_hashes": self.ep_hashes,
            "ep_rule": self.ep_rule, "window": list(self.window), "credits": self.credits,
        }, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes | None) -> "ChainState":
        if not data:
            return cls()
        d = json.loads(data)
        return cls(d["last_offset"], ChainHead(d["episode_head"][0], bytes.fromhex(d["episode_head"][1])),
                   ChainHead(d["sliding_head"][0], bytes.fromhex(d["sliding_head"][1])), d["episode"],
                   fair.Tally.from_json(d["ep_tally"]), list(d["ep_hashes"]), d["ep_rule"], deque(d["window"]),
                   d["credits"])


def outcome(rec: Mapping) -> list:
    """The fairness view of one decoded di.credit record (JSON-able): [[agent, credit]...], bidders,
    penalized, global reward. Raises InvalidCredit on a record no metric can use."""
    shares = rec.get("shares") or []
    if not shares:
        raise InvalidCredit("di.credit has no shares")
    credits = []
    for s in shares:
        c = float(s["credit"])
        if c != c or c in (float("inf"), float("-inf")):
            raise InvalidCredit(f"agent {s['agent_id']}: credit {c!r} is not finite")
        credits.append([s["agent_id"], c])
    penalized = sorted({p["agent_id"] for p in rec.get("penalties") or []})
    bidders = [a for a, c in credits if c != 0.0 or a in penalized]
    return [credits, bidders, penalized, float(rec["global_reward"])]


def _outcome(j: list) -> fair.StepOutcome:
    return fair.StepOutcome(tuple((a, c) for a, c in j[0]), tuple(j[1]), tuple(j[2]), j[3])


def step(state: ChainState, offset: int, rec: Mapping, credit_hash: bytes, *, window: int = WINDOW,
         hop: int = HOP) -> list[tuple[str, dict, list[bytes], str]]:
    """Apply one credit record (at input ``offset``) to ``state`` (mutated). Returns the outputs as
    ``(window kind "episode"|"sliding", fairness.metrics payload, source hashes, rule_version)``;
    an empty list and no change when ``offset <= state.last_offset`` (already processed)."""
    if offset <= state.last_offset:
        return []
    oj = outcome(rec)  # validate before touching the state
    episode = int(rec["episode"])
    rule = f"{rec.get('rule_version', '')};{fair.VERSION};{VERSION}"
    out = []
    if state.episode is not None and episode != state.episode and state.ep_tally.steps:
        metrics, agent_metrics = state.ep_tally.metrics()
        end = state.credits - 1
        out.append(("episode", {"episode": state.episode, "window": "episode",
                                "window_start": end - state.ep_tally.steps + 1, "window_end": end,
                                "metrics": metrics, "agent_metrics": agent_metrics},
                    [bytes.fromhex(h) for h in state.ep_hashes], state.ep_rule))
        state.ep_tally, state.ep_hashes = fair.Tally(), []
    h = credit_hash.hex()
    state.episode, state.ep_rule = episode, rule
    state.ep_tally.add(_outcome(oj))
    state.ep_hashes = [state.ep_hashes[0] if state.ep_hashes else h, h]
    state.window.append([oj, h])
    while len(state.window) > window:
        state.window.popleft()
    state.credits += 1
    if state.credits % hop == 0 and len(state.window) == window:
        metrics, agent_metrics = fair.window_metrics([_outcome(o) for o, _ in state.window])
        out.append(("sliding", {"episode": episode, "window": "sliding", "window_start": state.credits - window,
                                "window_end": state.credits - 1, "metrics": metrics, "agent_metrics": agent_metrics},
                    [bytes.fromhex(state.window[0][1]), bytes.fromhex(state.window[-1][1])], rule))
    state.last_offset = offset
    return out


def output_chain(credit_chain: str, kind: str) -> str | None:
    """``{run}:credit`` -> ``{run}:fairness:faust:{kind}``; None for other chains on marl.di.credit
    (e.g. ``{run}:credit:reprocess:...``), which this app leaves alone."""
    if not credit_chain.endswith(":credit"):
        return None
    return f"{credit_chain[:-len(':credit')]}:fairness:faust:{kind}"
