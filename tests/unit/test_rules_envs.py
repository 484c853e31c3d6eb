"""End to end without Kafka: the real mailbox_v0 / sandbox_v0 envs through the real harness, their
events through the Processor. A plain OPEN of a (hidden) malicious item gets the security-breach
penalty, GET+BIN on one item the conflict penalty; the label never reaches an agent's observation."""
from __future__ import annotations

import numpy as np

from eventlog.codec import default_codec
from eventlog.log import EventLog, MemorySink
from eventlog.privacy import FieldProtector, LocalKeyStore
from producers.envs import mailbox_v0, sandbox_v0
from producers.harness import run_episodes
from producers.policies import RandomPolicy
from stream_processors.processor import INPUT_TOPICS, Processor

SEED, EPISODES, INBOX = 11, 2, 12


class ScriptedMailbox:
    """get: GET every step; open: plain OPEN every step; bin: BIN on even steps, KEEP on odd ones."""

    version = "scripted-v1"

    def __init__(self):
        self.t = 0

    def act(self, observations, state=None):
        t, self.t = self.t, self.t + 1
        return {"get": (mailbox_v0.GET, 0.0), "open": (mailbox_v0.OPEN, 0.0),
                "bin": (mailbox_v0.BIN if t % 2 == 0 else mailbox_v0.KEEP, 0.0)}


def _harness_events(env, policy, env_id, tmp_path, **kw):
    sink = MemorySink()
    log = EventLog(sink, run_id="mb", producer_id="harness")
    keys = LocalKeyStore(tmp_path / "keys.db")
    try:
        run_episodes(env, policy, log, episodes=EPISODES, seed=SEED, env_id=env_id, env_version="0", config=kw,
                     protector=FieldProtector(keys) if hasattr(env, "subject_fields") else None)
    finally:
        keys.close()
    return sink.sent


def _processed(sent):
    """The processor's outputs for a harness's events (its input topics, in the order sent)."""
    p = Processor()
    return [e for i, (topic, key, value) in enumerate(sent) if topic in INPUT_TOPICS
            for e in p.feed(topic, 0, i, key, value)]


def test_mailbox_breach_and_conflict_from_harness_events(tmp_path):
    sent = _harness_events(mailbox_v0.parallel_env(inbox_size=INBOX), ScriptedMailbox(), "mailbox_v0", tmp_path,
                           inbox_size=INBOX)
    # ground truth, independently of the events: the env's hidden labels per episode
    truth = {}
    for ep in range(EPISODES):
        e = mailbox_v0.parallel_env(inbox_size=INBOX)
        e.reset(seed=SEED + ep)
        truth[ep] = [bool(x) for x in e._malicious]
    assert any(any(v) for v in truth.values()) and not all(all(v) for v in truth.values())

    codec = default_codec()
    # the label is in the privileged env.state flags only, never in an observation
    for topic, _, value in sent:
        rec = codec.decode(value)[1]
        if topic == "marl.env.state":
            assert rec["flags"] == (["label:malicious"] if truth[rec["episode"]][rec["step"]] else [])
        if topic == "marl.agent.observation":
            assert b"label:" not in value and "flags" not in rec

    outs = _processed(sent)
    credits = [codec.decode(e.value)[1] for e in outs if e.event_type == "di.credit"]
    assert not [e for e in outs if e.event_type == "dead.letter"]
    assert len(credits) == EPISODES * INBOX
    breaches = conflicts = 0
    for c in credits:
        assert c["rule_version"] == "mailbox_v0/di-2"
        pens = {(x["rule"], x["agent_id"]): x["amount"] for x in c["penalties"]}
        mal = truth[c["episode"]][c["step"]]
        assert (("security_breach_open_malicious", "open") in pens) == mal
        if mal:
            breaches += 1
            assert pens[("security_breach_open_malicious", "open")] == 1.0
        binned = c["step"] % 2 == 0
        assert (("conflict_get_bin", "get") in pens) == binned and (("conflict_get_bin", "bin") in pens) == binned
        conflicts += binned
        shares = {s["agent_id"]: s["credit"] for s in c["shares"]}
        assert abs(sum(shares.values()) - c["global_reward"]) < 1e-9
        if mal and not binned:
            assert shares["open"] < shares["get"]  # the breach lands on the opener
    assert breaches > 0 and conflicts == EPISODES * INBOX // 2


def test_sandbox_harness_events_score_with_the_sandbox_rules(tmp_path):
    env = sandbox_v0.parallel_env(n_sandboxes=3, max_cycles=8)
    sent = _harness_events(env, RandomPolicy(env, seed=4), "sandbox_v0", tmp_path, n_sandboxes=3)
    codec = default_codec()
    outs = _processed(sent)
    credits = [codec.decode(e.value)[1] for e in outs if e.event_type == "di.credit"]
    actions = [codec.decode(v)[1] for t, _, v in sent if t == "marl.joint.action"]
    assert not [e for e in outs if e.event_type == "dead.letter"]
    assert len(credits) == len(actions) > 0
    reviews = 0
    for c, a in zip(credits, actions):
        assert c["rule_version"] == "sandbox_v0/di-2"
        want = sorted(x["agent_id"] for x in a["actions"] if x["discrete"] == sandbox_v0.REQUEST_HUMAN_REVIEW)
        assert sorted(x["agent_id"] for x in c["penalties"]) == want
        assert all(x["rule"] == "human_review_cost" for x in c["penalties"])
        reviews += len(want)
        assert np.isclose(sum(s["credit"] for s in c["shares"]), c["global_reward"])
    assert reviews > 0
