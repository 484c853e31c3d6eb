"""Decision interpreter rules: penalties, clipping, normalization, splits, rule selection; and the
processor state machine (join order, dead letters, snapshot/restore) without Kafka."""
from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eventlog.codec import default_codec
from eventlog.log import EventLog, MemorySink
from tests.synthetic import synthetic_run
from stream_processors import rules as R
from stream_processors.processor import INPUT_TOPICS, Processor
from stream_processors.replay import comparable


def act(aid, a, r=0.0, done=False, cont=()):
    return R.AgentAct(aid, a, tuple(cont), r, False, done)


def mailbox(*acts, state=(), flags=()):
    return R.Decision(0, 0, tuple(acts), tuple(state), tuple(flags))


def test_late_fusion_orders_discrete_then_continuous():
    assert R.late_fusion([act("a", 2), act("b", -1, cont=(0.5, -0.5)), act("c", 0)]) == (2.0, 0.5, -0.5, 0.0)


def test_mailbox_conflict_get_and_bin_on_the_same_item():
    rules = R.MailboxRules()
    pens = rules.penalties(mailbox(act("get_0", 1), act("open_0", 0), act("bin_0", 1)))
    assert {(p.rule, p.agent_id, p.amount) for p in pens} == {
        ("conflict_get_bin", "get_0", 0.25), ("conflict_get_bin", "bin_0", 0.25)}
    assert rules.penalties(mailbox(act("get_0", 1), act("open_0", 0), act("bin_0", 0))) == []


def test_mailbox_plain_open_of_a_malicious_item_is_a_breach():
    rules = R.MailboxRules()
    breach = rules.penalties(mailbox(act("get", 0), act("open", 1), act("bin", 0), flags=("label:malicious",)))
    assert [(p.rule, p.agent_id, p.amount) for p in breach] == [("security_breach_open_malicious", "open", 1.0)]
    # safe semantics are not a breach; a plain OPEN of a benign item is not either
    for safe in (2, 3, 4):
        assert rules.penalties(mailbox(act("open_0", safe), flags=("malicious",))) == []
    assert rules.penalties(mailbox(act("open_0", 1))) == []
    assert rules.penalties(mailbox(act("open", 1), flags=("label:benign",))) == []


def test_mailbox_action_tables_are_the_real_envs():
    from producers.envs import mailbox_v0 as env_mod

    env = env_mod.parallel_env()
    rules = R.MailboxRules()
    for agent in env.possible_agents:
        assert rules.role(agent) == agent
        assert len(rules.action_names[agent]) == env.action_space(agent).n
    names = {"get": {env_mod.SKIP: "SKIP", env_mod.GET: "GET", env_mod.DEFER: "DEFER"},
             "open": {env_mod.NOOP: "NOOP", env_mod.OPEN: "OPEN", env_mod.OPEN_SAFE_PREVIEW: "OPEN_SAFE_PREVIEW",
                      env_mod.OPEN_SANDBOX: "OPEN_SANDBOX", env_mod.QUARANTINE: "QUARANTINE"},
             "bin": {env_mod.KEEP: "KEEP", env_mod.BIN: "BIN"}}
    for role, table in names.items():
        for i, n in table.items():
            assert rules.action_names[role][i] == n
    # DEFER (2) is a valid get action, not a conflict
    assert rules.penalties(mailbox(act("get", 2), act("open", 0), act("bin", 1))) == []


def test_sandbox_action_table_is_the_real_envs():
    from producers.envs import sandbox_v0 as env_mod

    assert tuple(a.upper() for a in env_mod.ACTIONS) == R.SANDBOX_ACTIONS


def test_mailbox_malicious_from_state_layout_in_run_config():
    rules = R.rules_for("mailbox_v0", json.dumps({"state_layout": {"malicious": 2}}))
    assert rules.malicious(mailbox(state=(0.0, 0.0, 1.0)))
    assert not rules.malicious(mailbox(state=(1.0, 1.0, 0.0)))


def test_mailbox_shares_route_penalties_and_sum_to_global():
    rules = R.MailboxRules()
    d = mailbox(act("get_0", 1, 1.0), act("open_0", 1, 1.0), act("bin_0", 1, 1.0), flags=("malicious",))
    credit, norm = rules.interpret(d, R.Normalizer())
    assert credit.raw_reward == 3.0
    # penalties: get/bin 0.5, open/bin 0.5, breach 1.0 -> pre = 1.0; first sample: scale 1
    assert credit.global_reward == pytest.approx(1.0)
    shares = {s.agent_id: s for s in credit.shares}
    assert sum(s.credit for s in credit.shares) == pytest.approx(credit.global_reward)
    assert shares["open_0"].credit < shares["get_0"].credit  # the breach lands on the opener
    assert shares["bin_0"].rule == "team_share+penalty_routing"
    assert norm.count == 1


def test_mailbox_unknown_role_or_action_is_invalid():
    with pytest.raises(R.InvalidDecision, match="no known role"):
        R.MailboxRules().penalties(mailbox(act("robot_1", 0)))
    with pytest.raises(R.InvalidDecision, match="outside"):
        R.MailboxRules().penalties(mailbox(act("bin_0", 7)))


def test_clipping_then_running_normalization():
    rules = R.MailboxRules()
    norm = R.Normalizer()
    credit, norm = rules.interpret(mailbox(act("get_0", 0, 50.0)), norm)
    assert credit.global_reward == 2.0  # clipped to clip_at, scale 1 before two samples
    credit, norm = rules.interpret(mailbox(act("get_0", 0, -50.0)), norm)
    # clipped values 2, -2: std 2 -> scale 0.5
    assert norm.scale == pytest.approx(0.5)
    assert credit.global_reward == pytest.approx(-1.0)


def test_normalizer_matches_population_std():
    xs = [0.3, -1.2, 2.0, 0.7, 0.0]
    n = R.Normalizer()
    for x in xs:
        n = n.update(x)
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))
    assert n.mean == pytest.approx(mean) and n.scale == pytest.approx(1 / std)


def test_sandbox_review_cost_only_each_agent_owns_its_sample():
    rules = R.SandboxRules()
    d = R.Decision(0, 0, (act("sandbox_0", 0, 1.0), act("sandbox_1", 2, 1.0), act("sandbox_2", 4, 0.0)))
    pens = rules.penalties(d)
    # monitoring one sandbox while another agent contains a different sandbox is no conflict
    assert [(p.rule, p.agent_id, p.amount) for p in pens] == [("human_review_cost", "sandbox_2", 0.05)]
    credit, _ = rules.interpret(d, R.Normalizer())
    assert sum(s.credit for s in credit.shares) == pytest.approx(credit.global_reward)
    assert {s.rule for s in credit.shares} == {"own_signal_scaled"}


def test_passthrough_clips_each_agent():
    credit, norm = R.PassThroughRules().interpret(R.Decision(0, 0, (act("a", 0, 25.0), act("b", 0, -3.0))),
                                                  R.Normalizer())
    assert [(s.credit, s.rule) for s in credit.shares] == [(10.0, "passthrough_clipped"), (-3.0, "passthrough_clipped")]
    assert credit.global_reward == 7.0 and credit.raw_reward == 22.0 and norm == R.Normalizer()


def test_rule_selection_by_env_id():
    assert R.rules_for("mailbox_v0").version == "mailbox_v0/di-2"
    assert R.rules_for("sandbox_v0").version == "sandbox_v0/di-2"
    assert R.rules_for("simple_spread_v3").version == "passthrough/di-1"
    assert R.rules_for("simple_spread_v3", default="sandbox_v0").version == "sandbox_v0/di-2"
    with pytest.raises(ValueError, match="no rule set"):
        R.rules_for(None, default="nope")


@given(st.lists(st.tuples(st.integers(0, 4), st.floats(-100, 100, allow_nan=False)), min_size=1, max_size=6),
       st.booleans())
def test_shares_always_sum_to_the_global_reward(acts, malicious):
    roles = ["get", "open", "bin"]
    d = R.Decision(0, 0, tuple(act(f"{roles[i % 3]}_{i}", a % (3, 5, 2)[i % 3], r) for i, (a, r) in enumerate(acts)),
                   (), ("malicious",) if malicious else ())
    for rules in (R.MailboxRules(), R.SandboxRules(), R.PassThroughRules()):
        credit, _ = rules.interpret(d, R.Normalizer(3, 0.1, 2.0))
        assert sum(s.credit for s in credit.shares) == pytest.approx(credit.global_reward, abs=1e-9)
        assert all(math.isfinite(s.credit) for s in credit.shares)


# ------------------------------------------------------------------ processor state machine


def _run_records(episodes=2, steps=30, agents=3):
    sink = MemorySink()
    synthetic_run(EventLog(sink, run_id="r", producer_id="p"), episodes=episodes, steps=steps, agents=agents)
    return [(t, k, v) for t, k, v in sink.sent if t in INPUT_TOPICS]


def _feed(p, recs):
    out = []
    for i, (t, k, v) in enumerate(recs):
        out += p.feed(t, 0, i, k, v)
    return out


def test_processor_output_does_not_depend_on_topic_interleaving():
    recs = _run_records()
    in_order = _feed(Processor(), recs)
    # worst case for the join: every joint action before any state, run.started last
    by_topic = sorted(recs, key=lambda r: {"marl.joint.action": 0, "marl.env.state": 1}.get(r[0], 2))
    shuffled = _feed(Processor(), by_topic)
    assert [comparable(e.value) for e in in_order] == [comparable(e.value) for e in shuffled]
    assert sum(e.event_type == "di.credit" for e in in_order) == 60


def _restored(a, b):
    """``b`` with ``a``'s committed state of run ``r`` (what a worker restores after a restart)."""
    b.restore("r", a.snapshot("r"))
    b.restore_dlq(a.snapshot_dlq())
    b.restore_joins([(run, kind, h, v) for (run, kind, h), v in a.take_join_changes().items() if v is not None])
    return b


def test_processor_snapshot_restore_continues_the_chain():
    recs = _run_records()
    whole = _feed(Processor(), recs)
    a = Processor(track_joins=True)
    first = _feed(a, recs[:70])
    b = _restored(a, Processor())
    rest = [e for i, (t, k, v) in enumerate(recs[70:], start=70) for e in b.feed(t, 0, i, k, v)]
    assert [comparable(e.value) for e in first + rest] == [comparable(e.value) for e in whole]
    # the restored writer links to the head it restored: no fork
    codec = default_codec()
    credits = [e for e in first + rest if e.event_type == "di.credit"]
    for prev, nxt in zip(credits, credits[1:]):
        assert codec.decode(nxt.value)[1]["prev_event_hash"] == prev.event_hash


def test_processor_dead_letters_bad_input_and_goes_on():
    recs = _run_records(episodes=1, steps=5)
    p = Processor()
    codec = default_codec()
    edited = bytearray(recs[-1][2])
    edited[-40] ^= 1
    letters = p.feed("marl.joint.action", 1, 7, "k", b"garbage")
    letters += p.feed("marl.joint.action", 1, 8, "k", bytes(edited))
    letters += p.feed("marl.env.state", 1, 9, "k", recs[-1][2])  # a joint action on the state topic
    kinds = [codec.decode(e.value)[1]["error_kind"] for e in letters]
    assert kinds == ["not_single_object", "integrity", "wrong_schema"]
    d = codec.decode(letters[0].value)[1]
    assert (d["source_topic"], d["source_partition"], d["source_offset"], d["payload"]) == \
        ("marl.joint.action", 1, 7, b"garbage")
    assert [e.event_type for e in _feed(p, recs)].count("di.credit") == 5
    assert p.dlq_head.seq == 2


def test_processor_unjoinable_action_goes_to_dead_letters_at_finish():
    recs = [r for r in _run_records(episodes=1, steps=4) if r[0] != "marl.env.state"]
    p = Processor(max_pending=None)
    assert [e.event_type for e in _feed(p, recs)] == []
    letters = [default_codec().decode(e.value)[1] for e in p.finish()]
    assert [d["error_kind"] for d in letters] == ["unjoinable"] * 4
    # the dead letter carries the original bytes of the joint action
    originals = {v for t, _, v in recs if t == "marl.joint.action"}
    assert {d["payload"] for d in letters} == originals
    assert all(d["payload_sha256"] == __import__("hashlib").sha256(d["payload"]).digest() for d in letters)


def test_a_credit_fairness_cannot_score_is_a_dead_letter_of_its_joint_action(monkeypatch):
    """A rule set that names one agent in two shares: the joint action it scored is dead-lettered,
    nothing is sealed for it, and the run's normalizer does not move."""
    import stream_processors.processor as proc

    class TwoSharesForOne:
        version = "broken/1"

        def interpret(self, d, norm):
            a = d.actions[0].agent_id
            return R.Credit(0.0, 2.0, (), (R.Share(a, 1.0, "x"), R.Share(a, 1.0, "x")), ()), norm.update(1.0)

    recs = _run_records(episodes=1, steps=3)
    p = Processor()
    monkeypatch.setattr(proc, "rules_for", lambda *a, **k: TwoSharesForOne())
    out = _feed(p, recs)
    letters = [default_codec().decode(e.value)[1] for e in out]
    assert [e.event_type for e in out] == ["dead.letter"] * 3
    assert {d["error_kind"] for d in letters} == {"invalid"}
    assert all("broken/1" in d["reason"] and "two shares" in d["reason"] for d in letters)
    assert {d["payload"] for d in letters} == {v for t, _, v in recs if t == "marl.joint.action"}
    assert p.runs["r"].norm == R.Normalizer() and p.runs["r"].credit_head.seq == -1


def _wide_run(steps=1500, agents=20):
    sink = MemorySink()
    synthetic_run(EventLog(sink, run_id="w", producer_id="p"), episodes=1, steps=steps, agents=agents)
    return [(t, k, v) for t, k, v in sink.sent if t in INPUT_TOPICS]


def test_a_backlog_never_makes_one_state_message_large():
    """The MSG_SIZE_TOO_LARGE bug: pending joins lived in the run's snapshot. Now each waiting record
    is its own entry, bounded by its input size, and the snapshot does not grow with the backlog."""
    recs = _wide_run()
    actions = [r for r in recs if r[0] == "marl.joint.action"]
    rest = [r for r in recs if r[0] != "marl.joint.action"]
    p = Processor(track_joins=True, max_pending=None)
    assert _feed(p, [r for r in rest if r[0] == "marl.run.lifecycle"][:1] + actions) == []
    changes = p.take_join_changes()
    assert len(changes) == len(actions) == 1500
    assert sum(len(v) for v in changes.values()) > 2_000_000  # the old single snapshot would have been > 1 MB
    biggest = max(len(v) for t, _, v in actions)
    assert max(len(v) for v in changes.values()) < biggest + 200
    assert len(p.snapshot("w")) < 5_000
    # restore from entries, then join: every action scored once, in chain order, entries deleted
    q = Processor(track_joins=True, max_pending=None)
    q.restore("w", p.snapshot("w"))
    q.restore_joins([(run, kind, h, v) for (run, kind, h), v in changes.items()])
    outs = _feed(q, rest)
    credits = [default_codec().decode(e.value)[1] for e in outs if e.event_type == "di.credit"]
    assert [c["step"] for c in credits] == list(range(1500))
    after = q.take_join_changes()
    assert set(after) == set(changes) and all(v is None for v in after.values())  # tombstones for all
    assert len(q.snapshot("w")) < 100_000


def test_rules_override_sets_rule_version():
    recs = _run_records(episodes=1, steps=3)
    outs = _feed(Processor(rules_override="sandbox_v0"), recs)
    assert {default_codec().decode(e.value)[1]["rule_version"] for e in outs if e.event_type == "di.credit"} == \
        {"sandbox_v0/di-2"}


# ------------------------------------------------------------------ signed checkpoints of the output chains


def _feed_checkpointed(p, recs, every):
    """Feed as the worker does: one checkpoint() per ``every`` records (a transaction)."""
    out = []
    for i, (t, k, v) in enumerate(recs):
        out += p.feed(t, 0, i, k, v)
        if (i + 1) % every == 0:
            out += p.checkpoint()
    return out + p.checkpoint()


def _as_records(events):
    from eventlog.kafka import Record

    offsets: dict[str, int] = {}
    recs = []
    for e in events:
        o = offsets[e.topic] = offsets.get(e.topic, -1) + 1
        recs.append(Record(e.topic, 0, o, e.chain_id, e.value, 0))
    return recs


def test_processor_signs_its_credit_and_fairness_chains_and_a_truncation_after_a_checkpoint_is_caught():
    from eventlog.checkpoint import Signer
    from eventlog.verify import BreakKind, verify_records

    signer = Signer.from_seed(b"di-worker")
    recs = _run_records()
    signed = _feed_checkpointed(Processor(signer=signer), recs, every=40)
    unsigned = _feed(Processor(), recs)
    data = [e for e in signed if e.event_type != "audit.checkpoint"]
    assert [comparable(e.value) for e in data] == [comparable(e.value) for e in unsigned]   # same outputs
    cps = [e for e in signed if e.event_type == "audit.checkpoint"]
    assert {e.chain_id for e in cps} == {"r:checkpoints:marlgrc-di"}
    report = verify_records(_as_records(signed), signer.public_key)
    assert report.ok, report.breaks
    by_chain = {c.chain_id: c for c in report.chains}
    for chain in ("r:credit", "r:fairness"):
        c = by_chain[chain]
        assert c.checkpoints_verified >= 2 and c.signed_through_seq == c.last_seq, (chain, c)
    # drop the credit chain's last event, which a checkpoint covers: the auditor sees the truncation
    last_credit = max((e for e in data if e.chain_id == "r:credit"), key=lambda e: e.seq)
    cut = verify_records(_as_records([e for e in signed if e is not last_credit]), signer.public_key)
    assert not cut.ok
    assert any(c.first_break and c.first_break.kind == BreakKind.TRUNCATED and c.chain_id == "r:credit"
               for c in cut.chains)
    # a checkpoint signed by another key is refused
    forged = _feed_checkpointed(Processor(signer=Signer.from_seed(b"someone else")), recs, every=40)
    assert not verify_records(_as_records(forged), signer.public_key).ok


def test_processor_checkpoint_head_survives_snapshot_and_restore():
    from eventlog.checkpoint import Signer
    from eventlog.verify import verify_records

    signer = Signer.from_seed(b"di-worker")
    recs = _run_records()
    a = Processor(track_joins=True, signer=signer)
    first = _feed_checkpointed(a, recs[:70], every=35)
    b = _restored(a, Processor(signer=signer))
    rest = [e for i, (t, k, v) in enumerate(recs[70:], start=70) for e in b.feed(t, 0, i, k, v)]
    rest += b.checkpoint()
    report = verify_records(_as_records(first + rest), signer.public_key)
    assert report.ok, report.breaks


# ------------------------------------------------------------------ every chain signed through its head


def _signed_run(signer, run_id="r"):
    """A run as a signing producer writes it and closes it (every input chain signed, run.finished):
    (topic, key, value) of everything, and the processor's input records among them."""
    sink = MemorySink()
    log = EventLog(sink, run_id=run_id, producer_id="p", signer=signer)
    synthetic_run(log, episodes=2, steps=30, agents=3)
    log.close()
    return sink.sent, [(t, k, v) for t, k, v in sink.sent if t in INPUT_TOPICS]


def _records(items):
    """(topic, key, value) or events -> Records, offsets per topic in order (one partition)."""
    from eventlog.kafka import Record

    offsets: dict[str, int] = {}
    out = []
    for it in items:
        t, k, v = (it.topic, it.chain_id, it.value) if hasattr(it, "chain_id") else it
        o = offsets[t] = offsets.get(t, -1) + 1
        out.append(Record(t, 0, o, k, v, 0))
    return out


def _verify(records, public_key, *, require_signed=False):
    from eventlog.verify import Verifier, split_checkpoints

    cps, data = split_checkpoints(records)
    v = Verifier(public_key, require_signed=require_signed)
    v.add_checkpoints(cps)
    v.feed(data)
    return v.finish()


def _with_poison(recs, at):
    """``recs`` with an undecodable record on marl.joint.action at each index in ``at``."""
    out = list(recs)
    for i in sorted(at, reverse=True):
        out.insert(i, ("marl.joint.action", "poison", b"\x00poison %d" % i))
    return out


def test_every_chain_the_processor_writes_is_signed_through_its_head_across_a_restore():
    """Issue 14 item 3: after a finished run, credit, fairness, dead-letter and both checkpoint chains
    verify with the key and no `unsigned` break, each signed through its last event, also when the
    worker restarted from its saved state in the middle."""
    from eventlog.checkpoint import Signer
    from eventlog.verify import BreakKind

    signer = Signer.from_seed(b"di-worker")
    produced, inputs = _signed_run(signer)
    recs = _with_poison(inputs, at=(10, 120))
    a = Processor(track_joins=True, signer=signer)
    first = _feed_checkpointed(a, recs[:90], every=35)
    b = _restored(a, Processor(signer=signer))
    rest = []
    for n, (i, (t, k, v)) in enumerate(enumerate(recs[90:], start=90), start=1):
        rest += b.feed(t, 0, i, k, v)
        if n % 35 == 0:
            rest += b.checkpoint()
    rest += b.checkpoint()
    records = _records(list(produced) + first + rest)
    report = _verify(records, signer.public_key)
    assert report.ok, report.breaks
    assert not any(b.kind == BreakKind.UNSIGNED for b in report.breaks)
    assert not [n for n in report.notes if "not covered" in n], report.notes
    strict = _verify(records, signer.public_key, require_signed=True)   # the dead-letter chain belongs to no run
    assert strict.ok, strict.breaks
    chains = {c.chain_id: c for c in strict.chains}
    written = {"r:credit", "r:fairness", "dlq:marlgrc-di", "r:checkpoints:marlgrc-di",
               "dlq:marlgrc-di:checkpoints:marlgrc-di"}
    assert written <= set(chains)
    for chain in written:
        c = chains[chain]
        assert c.last_seq >= 1 and c.signed_through_seq == c.last_seq and c.unsigned == 0, (chain, c)
    assert chains["dlq:marlgrc-di"].events == 2                       # one poison record before the restore, one after
    assert chains["r:checkpoints:marlgrc-di"].checkpoints_verified >= 4   # it signs itself, on both sides of it
    assert chains["dlq:marlgrc-di:checkpoints:marlgrc-di"].checkpoints_verified == 2


def test_without_its_last_self_checkpoint_the_checkpoint_chain_of_a_finished_run_is_unsigned():
    from eventlog.checkpoint import Signer
    from eventlog.verify import BreakKind

    signer = Signer.from_seed(b"di-worker")
    produced, inputs = _signed_run(signer)
    out = _feed_checkpointed(Processor(signer=signer), inputs, every=40)
    own = [e for e in out if e.chain_id == "r:checkpoints:marlgrc-di"]
    last = own[-1]
    assert default_codec().decode(last.value)[1]["checked_chain_id"] == "r:checkpoints:marlgrc-di"
    assert _verify(_records(list(produced) + out), signer.public_key).ok
    report = _verify(_records(list(produced) + [e for e in out if e is not last]), signer.public_key)
    assert [(b.kind, b.chain_id) for b in report.breaks] == [(BreakKind.UNSIGNED, "r:checkpoints:marlgrc-di")]


def test_each_transaction_signs_its_checkpoint_chain_from_the_previous_self_checkpoint():
    """HASHING.md §4: the self-checkpoints of a checkpoint chain are contiguous: each starts at the
    previous one (first_seq = its seq, prev_head_hash = the hash before it) and ends just before itself."""
    from eventlog.checkpoint import Signer

    codec = default_codec()
    signer = Signer.from_seed(b"di-worker")
    _, inputs = _signed_run(signer)
    out = _feed_checkpointed(Processor(signer=signer), inputs, every=30)
    chain = [e for e in out if e.chain_id == "r:checkpoints:marlgrc-di"]
    selfs = [(e, codec.decode(e.value)[1]) for e in chain]
    selfs = [(e, d) for e, d in selfs if d["checked_chain_id"] == "r:checkpoints:marlgrc-di"]
    assert len(selfs) >= 3
    prev = None
    for e, d in selfs:
        assert d["last_seq"] == e.seq - 1
        if prev is None:
            assert (d["first_seq"], d["prev_head_hash"]) == (0, bytes(32))
        else:
            assert (d["first_seq"], d["prev_head_hash"]) == (prev[1]["last_seq"] + 1, prev[1]["head_event_hash"])
            assert d["first_seq"] == prev[0].seq                  # it covers the previous self-checkpoint
        prev = (e, d)
    assert chain[-1] is selfs[-1][0]   # every transaction ends with the chain's checkpoint of itself


def test_states_saved_before_checkpoint_chains_signed_themselves_still_load_and_continue():
    from eventlog.checkpoint import Signer
    from stream_processors.processor import RunState

    codec = default_codec()
    signer = Signer.from_seed(b"di-worker")
    _, inputs = _signed_run(signer)
    a = Processor(track_joins=True, signer=signer)
    first = _feed_checkpointed(a, inputs[:80], every=80)
    saved = json.loads(a.snapshot("r"))
    head = a.runs["r"].checkpoints.head
    # the previous revision: the checkpoint chain's head only; the one before it: nothing signed
    legacy = {k: v for k, v in saved.items() if k != "checkpoint_chain"}
    assert legacy["checkpoint_head"] == [head.seq, head.event_hash.hex()]
    st = RunState.from_json(legacy)
    assert (st.checkpoints.head, st.checkpoints.covered) == (head, head)
    unsigned = RunState.from_json({k: v for k, v in legacy.items() if k != "checkpoint_head"})
    assert unsigned.checkpoints.head.seq == unsigned.checkpoints.covered.seq == -1
    b = Processor(signer=signer)
    b.restore("r", json.dumps(legacy).encode())
    b.restore_dlq(json.dumps([4, "ab" * 32]).encode())        # the dead-letter head as it used to be saved
    b.restore_joins([(run, kind, h, v) for (run, kind, h), v in a.take_join_changes().items() if v is not None])
    assert b.dlq_head.seq == 4 and b.dlq_checkpoints.head.seq == -1
    rest = [e for i, (t, k, v) in enumerate(inputs[80:], start=80) for e in b.feed(t, 0, i, k, v)] + b.checkpoint()
    chain = [e for e in rest if e.chain_id == "r:checkpoints:marlgrc-di"]
    assert chain[0].seq == head.seq + 1 and codec.decode(chain[0].value)[1]["prev_event_hash"] == head.event_hash
    own = codec.decode(chain[-1].value)[1]
    # the events the old revision left unsigned stay so; from the restore on, everything is covered
    assert (own["checked_chain_id"], own["first_seq"], own["prev_head_hash"], own["last_seq"]) == \
        ("r:checkpoints:marlgrc-di", head.seq + 1, head.event_hash, chain[-1].seq - 1)
    assert first and rest


def test_reprocessed_results_to_be_written_end_with_the_checkpoints_that_sign_them():
    from eventlog.checkpoint import Signer
    from eventlog.kafka import Record
    from stream_processors.replay import reprocess_records

    signer = Signer.from_seed(b"reprocess")
    produced, inputs = _signed_run(signer)
    recs = [Record(t, 0, i, k, v, 0) for i, (t, k, v) in enumerate(_with_poison(inputs, at=(5,)))]
    p = Processor(consumer="reprocess:r", producer_id="marlgrc-reprocess-x", credit_stream="credit:reprocess:x",
                  fairness_stream="fairness:reprocess:x", signer=signer, max_pending=None, max_states=None)
    events = reprocess_records(recs, p)
    last = events[-1]
    assert last.chain_id.endswith(":checkpoints:marlgrc-reprocess-x")
    assert default_codec().decode(last.value)[1]["checked_chain_id"] == last.chain_id   # its checkpoint of itself
    report = _verify(_records(list(produced) + events), signer.public_key, require_signed=True)
    assert report.ok, report.breaks
    chains = {c.chain_id: c for c in report.chains}
    for chain in ("r:credit:reprocess:x", "r:fairness:reprocess:x", "r:checkpoints:marlgrc-reprocess-x",
                  "dlq:reprocess:r", "dlq:reprocess:r:checkpoints:marlgrc-reprocess-x"):
        assert chains[chain].signed_through_seq == chains[chain].last_seq >= 0, chain
    unsigned = reprocess_records(recs, Processor(consumer="reprocess:r", max_pending=None, max_states=None))
    assert [e.event_type for e in unsigned] == [e.event_type for e in events if e.event_type != "audit.checkpoint"]
