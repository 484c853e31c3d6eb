"""Decision-interpreter rule sets of the seed 001 / 003 envs (market_v0, retail_v0, banking_v0):
hand-computed cases at the seeds' numbers, refusals, properties (shares sum to g, deterministic, the
rule reads what the env computed), and each env run through the real harness into the Processor."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eventlog.codec import default_codec
from eventlog.log import EventLog, MemorySink
from eventlog.privacy import FieldProtector, LocalKeyStore
from producers.envs import banking_v0, market_v0, retail_v0
from producers.harness import run_episodes
from producers.policies import HeuristicPolicy, RandomPolicy
from stream_processors import rules as R
from stream_processors.processor import INPUT_TOPICS, Processor


def act(aid, a=-1, r=0.0, cont=()):
    return R.AgentAct(aid, a, tuple(float(x) for x in cont), float(r), False, False)


def decision(*acts, state=()):
    return R.Decision(0, 0, tuple(acts), tuple(float(x) for x in np.asarray(state, np.float32)), ())


def credit(rules, d):
    c, _ = rules.interpret(d, R.Normalizer())
    return c, {s.agent_id: s.credit for s in c.shares}, {s.agent_id: s.rule for s in c.shares}


def test_rule_sets_chosen_by_env_id_with_their_versions():
    assert R.rules_for("market_v0").version == "market/seed001-1"
    assert R.rules_for("retail_v0").version == "retail/seed003-1"
    assert R.rules_for("banking_v0").version == "banking/seed003-1"
    # env args from the run's config, at the top level (harness) or under env_args (marlgrc run)
    assert R.rules_for("market_v0", json.dumps({"env_args": {"fair_reward": False}})).fair_reward is False
    r = R.rules_for("retail_v0", json.dumps({"lead_time": 3, "reward_mode": "shared", "capacity": 50}))
    assert (r.lead_time, r.reward_mode, r.capacity) == (3, "shared", 50)


# --- market_v0 (seed 001) --------------------------------------------------------------------------
def market_block(gini=0.25, ubi=0.0, diversity=0.0, boost=0.0, complexity=1.0):
    b = np.zeros(25, np.float32)
    b[18], b[20], b[21], b[22], b[23] = diversity, gini, ubi, boost, complexity
    return b


def market_state(*blocks):
    return np.concatenate([*blocks, [1.0, 1.0, 0.0, 0.0, 0.0]])


def test_market_winner_keeps_its_outcome_and_the_gini_bonus_is_pooled():
    # node_0 wins a network scan (2.5x): success +1, time ratio 0.8 -> +0.06, profit 40 after tax -> +0.4,
    # Gini 0.25 < 0.3 -> +0.1, UBI-eligible -> +0.05, trust +0.02: 1.63 x 2.5 = 4.075
    # node_1 bid and lost: standing reward = Gini bonus 0.1 (not UBI-eligible, not monopolizing)
    state = market_state(market_block(ubi=1.0, complexity=2.5), market_block(complexity=2.5))
    d = decision(act("node_0", 3, 1.63 * 2.5), act("node_1", 5, 0.1), state=state)
    c, shares, names = credit(R.MarketRules(), d)
    # own parts: 4.075 - 0.25 and 0.1 - 0.1; pool 0.35, 0.175 each; first step: g = raw (scale 1)
    assert c.raw_reward == pytest.approx(4.175) and c.global_reward == pytest.approx(4.175)
    assert shares == pytest.approx({"node_0": 4.0, "node_1": 0.175})
    assert names == {"node_0": "winner_outcome+fairness_pool", "node_1": "standing+fairness_pool"}
    assert c.penalties == ()


def test_market_monopolist_keeps_its_diversity_penalty_and_a_boosted_winner_is_named():
    # Gini 0.35: no bonus anywhere. node_1 monopolizes (diversity -0.2): standing -0.1, its own.
    # node_0 (affirmative boost 0.15) wins a shell job (1x): failure -1, time ratio 1.2 -> 0, cost 30 -> -0.3
    state = market_state(market_block(gini=0.35, boost=0.15), market_block(gini=0.35, diversity=-0.2),
                         market_block(gini=0.35))
    d = decision(act("node_0", 1, -1.3), act("node_1", 2, -0.1), act("node_2", 0, 0.0), state=state)
    c, shares, names = credit(R.MarketRules(), d)
    assert shares == pytest.approx({"node_0": -1.3, "node_1": -0.1, "node_2": 0.0})
    assert names == {"node_0": "winner_outcome+affirmative_boost", "node_1": "standing", "node_2": "standing"}


def test_market_profit_only_rewards_are_recognised_without_config():
    # fair_reward=False: losers get 0 although Gini < 0.3; the fair rule cannot explain two mismatches
    state = market_state(market_block(), market_block())
    d = decision(act("node_0", 4, 1.5), act("node_1", 2, 0.0), state=state)
    _, shares, names = credit(R.MarketRules(), d)
    assert shares == pytest.approx({"node_0": 1.5, "node_1": 0.0})
    assert names == {"node_0": "winner_outcome", "node_1": "standing"}
    with pytest.raises(R.InvalidDecision, match="standing reward"):  # the run's config says fair
        R.MarketRules(fair_reward=True).interpret(d, R.Normalizer())


@pytest.mark.parametrize("d, why", [
    (decision(act("node_0", 1, 2.0), act("node_1", 1, 3.0), state=market_state(market_block(), market_block())),
     "standing reward"),                                            # two winners
    (decision(act("node_0", 0, 2.0), act("node_1", 1, 0.1), state=market_state(market_block(), market_block())),
     "standing reward"),                                            # a non-bidder won
    (decision(act("node_0", 1, 0.1), act("node_1", 1, 0.1), state=market_state(market_block())), "needs 55"),
    (decision(act("node_0", 9, 0.1), state=market_state(market_block())), "outside 0..8"),
    (decision(act("node_7", 1, 0.1), state=market_state(market_block())), "not one of node_0"),
])
def test_market_refuses_what_is_not_market_v0(d, why):
    with pytest.raises(R.InvalidDecision, match=why):
        R.MarketRules().interpret(d, R.Normalizer())


# --- retail_v0 (seed 003 RETAIL) ----------------------------------------------------------------
def retail_state(*inventories, lead_time=2, capacity=100):
    n, blk = len(inventories), 5 + lead_time
    s = np.zeros(n * (blk + 1), np.float32)
    for i, inv in enumerate(inventories):
        s[blk * i] = inv / capacity
    return s


def test_retail_local_costs_with_a_transfer_charged_to_its_sender():
    # warehouse_0 (30 units) sends rint(0.8 x 10) = 8 units to warehouse_1 (5 units): $0.50 x 8 = $4
    # to the sender, which holds 20 at the end of the day ($2): -6. warehouse_1: 13 on hand, demand
    # 15, 2 units short at $10: -20 (the 8 received units relieved 8 stockouts: in its own reward)
    d = decision(act("warehouse_0", r=-6.0, cont=(0.5, 0.8)), act("warehouse_1", r=-20.0, cont=(0.0, 0.0)),
                 state=retail_state(30, 5))
    rules = R.RetailRules()
    assert rules.transfers(d) == ([8, 0], [0, 8])
    c, shares, names = credit(rules, d)
    # first step: scale 1, g = -26 clipped to the normalizer's [-10, 10]: every share x 10/26
    assert c.raw_reward == -26.0 and c.global_reward == -10.0
    assert shares == pytest.approx({"warehouse_0": -6.0 * 10 / 26, "warehouse_1": -20.0 * 10 / 26})
    assert names == {"warehouse_0": "own_cost+transfer_sent", "warehouse_1": "own_cost+transfer_received"}


def test_retail_shared_cost_transfer_to_the_sender_rest_pooled():
    # reward_mode="shared": both get -26/2; the $4 transfer is warehouse_0's, the other $22 split evenly
    d = decision(act("warehouse_0", r=-13.0, cont=(0.5, 0.8)), act("warehouse_1", r=-13.0, cont=(0.0, 0.0)),
                 state=retail_state(30, 5))
    _, shares, names = credit(R.RetailRules(), d)  # no config: equal rewards read as shared
    assert shares == pytest.approx({"warehouse_0": -15.0 * 10 / 26, "warehouse_1": -11.0 * 10 / 26})
    assert names == {"warehouse_0": "pooled_cost+transfer_sent", "warehouse_1": "pooled_cost"}


def test_retail_transfers_limited_by_stock_and_room_as_the_env_limits_them():
    # warehouse_0 has 3 units and asks to send 10: 3 go. warehouse_1 has 98 of 100: room 2 (+ nothing it sends)
    d = decision(act("warehouse_0", r=-1.5, cont=(0.0, 1.0)), act("warehouse_1", r=0.0, cont=(0.0, 0.0)),
                 state=retail_state(3, 50))
    assert R.RetailRules().transfers(d) == ([3, 0], [0, 3])
    d = decision(act("warehouse_0", r=-1.0, cont=(0.0, 1.0)), act("warehouse_1", r=0.0, cont=(0.0, 0.0)),
                 state=retail_state(30, 98))
    assert R.RetailRules().transfers(d) == ([2, 0], [0, 2])


@pytest.mark.parametrize("d, why", [
    # a local reward cheaper than the 8 units sent ($4)
    (decision(act("warehouse_0", r=-3.0, cont=(0.5, 0.8)), act("warehouse_1", r=-20.0, cont=(0.0, 0.0)),
              state=retail_state(30, 5)), "costs less"),
    (decision(act("warehouse_0", r=-3.0, cont=(0.5, 0.8)), act("warehouse_1", r=-20.0, cont=(0.0, 0.0)),
              state=retail_state(30, 5)[:-1]), "needs 16"),
    (decision(act("warehouse_0", r=-3.0, cont=(0.5,)), act("warehouse_1", r=-20.0, cont=(0.0, 0.0)),
              state=retail_state(30, 5)), "needs 2"),
])
def test_retail_refuses_what_is_not_retail_v0(d, why):
    with pytest.raises(R.InvalidDecision, match=why):
        R.RetailRules(reward_mode="local").interpret(d, R.Normalizer())


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 5), st.integers(0, 2**31 - 1))
def test_retail_reads_the_transfers_the_env_computes(n, seed):
    """Property: on random inventories and actions the rule's sent/received equal the env's
    ``feasible_transfers``; with the env's local costs the shares are the rewards and sum to g."""
    rng = np.random.default_rng(seed)
    inv = rng.integers(0, 101, n)
    acts = rng.uniform(0, 1, (n, n)).astype(np.float32)
    req = np.zeros((n, n))
    for i in range(n):
        req[i, [j for j in range(n) if j != i]] = np.rint(acts[i, 1:].astype(np.float64) * 10)
    sent_m = retail_v0.feasible_transfers(req, inv, 100 - inv)
    on_hand = inv - sent_m.sum(1) + sent_m.sum(0)
    left, unmet = retail_v0.serve(on_hand, rng.poisson(5, n))
    costs = retail_v0.day_cost(unmet, left, sent_m.sum(1))
    d = decision(*[act(f"warehouse_{i}", r=-costs[i], cont=acts[i]) for i in range(n)], state=retail_state(*inv))
    rules = R.RetailRules(reward_mode="local")
    assert rules.transfers(d) == ([int(x) for x in sent_m.sum(1)], [int(x) for x in sent_m.sum(0)])
    c, shares, _ = credit(rules, d)
    assert math.isclose(sum(shares.values()), c.global_reward, abs_tol=1e-9)
    assert credit(rules, d)[1] == shares


# --- banking_v0 (seed 003 BANKING) ----------------------------------------------------------------
def banking_state(*tx):
    """tx: (log10(amount), rating 0 low / 1 standard / 2 high) per router."""
    s = np.zeros(6 * len(tx) + 9, np.float32)
    for i, (lg, rating) in enumerate(tx):
        s[4 * i] = lg / 6
        s[4 * i + 1 + rating] = 1.0
    return s


def test_banking_portfolio_penalty_split_by_risk_contribution():
    # two $1,000 transactions: router_0 a high-risk customer on internal (3% x 3 = 9%), router_1 a standard
    # one on external (2%): contributions 4.5% and 1%, portfolio 5.5% >= 5%: each router pays 5
    # router_0: 30 ms -> 0.3, $0.10, 0.045/0.05 = 0.9, +5 = -6.3
    # router_1: 120 ms -> 1.2 + 1 (latency violation), $0.50, 0.01/0.05 = 0.2, +5 = -7.9
    d = decision(act("router_0", 0, -6.3), act("router_1", 1, -7.9), state=banking_state((3, 2), (3, 1)))
    c, shares, names = credit(R.BankingRules(), d)
    # own terms -1.3 and -2.9; the joint 10 split 9/11 : 2/11
    # g = -14.2 clipped to -10: every share x 10/14.2
    assert c.raw_reward == pytest.approx(-14.2) and c.global_reward == -10.0
    k = 10 / 14.2
    assert shares == pytest.approx({"router_0": k * (-1.3 - 90 / 11), "router_1": k * (-2.9 - 20 / 11)})
    assert set(names.values()) == {"own_terms+portfolio_penalty_by_risk"}


def test_banking_without_a_breach_each_router_keeps_its_terms():
    # router_0 standard on internal (3%), router_1 low on external (1%): portfolio 2%
    # router_0: 20 ms -> 0.2 + $0.10 + 0.015/0.05 = 0.3 -> -0.6; router_1: 80 ms -> 0.8 + 0.5 + 0.1 -> -1.4
    d = decision(act("router_0", 0, -0.6), act("router_1", 1, -1.4), state=banking_state((3, 1), (3, 0)))
    _, shares, names = credit(R.BankingRules(), d)
    assert shares == pytest.approx({"router_0": -0.6, "router_1": -1.4})
    assert set(names.values()) == {"own_terms"}


@pytest.mark.parametrize("d, why", [
    # blockchain is never under 200 ms: a reward of -3 cannot be one
    (decision(act("router_0", 2, -3.0), state=banking_state((3, 0))), "do not decompose"),
    (decision(act("router_0", 3, -3.0), state=banking_state((3, 0))), "not 0, 1 or 2"),
    (decision(act("router_0", 0, -3.0), state=banking_state((3, 0))[:-2]), "needs 15"),
    (decision(act("router_0", 0, -3.0), state=np.zeros(15)), "one-hot"),
])
def test_banking_refuses_what_is_not_banking_v0(d, why):
    with pytest.raises(R.InvalidDecision, match=why):
        R.BankingRules().interpret(d, R.Normalizer())


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_banking_env_rewards_decompose_and_the_penalty_follows_risk(n, seed):
    """Property: rewards built with the env's own functions decompose; the shares sum to g; the
    portfolio penalty lands in proportion to contribution (a router with more risk pays more)."""
    rng = np.random.default_rng(seed)
    lg = np.round(rng.uniform(0, 6, n), 3)
    rating, channel = rng.integers(0, 3, n), rng.integers(0, 3, n)
    ahead = rng.uniform(0, 10, n)
    state = banking_state(*zip(lg, rating))
    amount = 10.0 ** (6.0 * state[0:4 * n:4].astype(np.float64))
    risk = banking_v0.transaction_risk(channel, rating)
    contrib = banking_v0.risk_contributions(amount, np.atleast_1d(risk))
    port = banking_v0.portfolio_risk(amount, np.atleast_1d(risk))
    lat = np.atleast_1d(banking_v0.channel_latency(channel, ahead))
    rewards = [banking_v0.router_reward(lat[i], banking_v0.channel_cost(int(channel[i])), contrib[i], port)
               for i in range(n)]
    d = decision(*[act(f"router_{i}", int(channel[i]), rewards[i]) for i in range(n)], state=state)
    c, shares, names = credit(R.BankingRules(), d)
    assert math.isclose(sum(shares.values()), c.global_reward, abs_tol=1e-9)
    breach = all(v.endswith("portfolio_penalty_by_risk") for v in names.values())
    assert breach == banking_v0.risk_violation(port)
    if breach:  # the pool moved from equal shares to risk shares
        for i in range(n):
            own = rewards[i] + 5.0
            k = c.global_reward / c.raw_reward
            assert shares[f"router_{i}"] == pytest.approx(k * (own - 5.0 * n * contrib[i] / port))
    assert credit(R.BankingRules(), d)[1] == shares


# --- each env through the real harness into the Processor ---------------------------------------
class Recording:
    """Wraps an env: every step's infos, in order (ground truth the events do not carry)."""

    def __init__(self, env):
        self.env, self.infos = env, []

    def __getattr__(self, name):
        return getattr(self.env, name)

    def step(self, actions):
        out = self.env.step(actions)
        self.infos.append(out[4])
        return out


def _run(env, policy, env_id, tmp_path, episodes=2, seed=5, **config):
    sink = MemorySink()
    log = EventLog(sink, run_id=f"{env_id}-run", producer_id="harness")
    keys = LocalKeyStore(tmp_path / f"{env_id}-{seed}.db")
    try:
        run_episodes(env, policy, log, episodes=episodes, seed=seed, env_id=env_id, env_version="0", config=config,
                     protector=FieldProtector(keys) if hasattr(env.env if isinstance(env, Recording) else env,
                                                               "subject_fields") else None)
    finally:
        keys.close()
    codec = default_codec()
    sent = sink.sent

    def process():
        p = Processor()
        return [e for i, (topic, key, value) in enumerate(sent) if topic in INPUT_TOPICS
                for e in p.feed(topic, 0, i, key, value)]

    outs = process()
    assert not [codec.decode(e.value)[1]["reason"] for e in outs if e.event_type == "dead.letter"]
    credits = [codec.decode(e.value)[1] for e in outs if e.event_type == "di.credit"]
    actions = [codec.decode(v)[1] for t, _, v in sent if t == "marl.joint.action"]
    assert len(credits) == len(actions) > 0
    again = [codec.decode(e.value)[1] for e in process() if e.event_type == "di.credit"]
    assert [(c["shares"], c["global_reward"]) for c in again] == [(c["shares"], c["global_reward"]) for c in credits]
    for c in credits:
        assert math.isclose(sum(s["credit"] for s in c["shares"]), c["global_reward"], rel_tol=1e-9, abs_tol=1e-9)
    return credits


def _versions(credits):
    return {c["rule_version"] for c in credits}


@pytest.mark.parametrize("policy, fair", [("random", True), ("heuristic", True), ("random", False)])
def test_market_through_the_harness_names_the_env_s_winner(tmp_path, policy, fair):
    env = Recording(market_v0.parallel_env(fair_reward=fair))
    pol = RandomPolicy(env.env, seed=3) if policy == "random" else HeuristicPolicy(env.env)
    credits = _run(env, pol, "market_v0", tmp_path, episodes=3,
                            **({} if fair else {"env_args": {"fair_reward": False}}))
    assert _versions(credits) == {"market/seed001-1"}
    assert len(credits) == len(env.infos)
    winners = 0
    for c, infos in zip(credits, env.infos):
        named = {s["agent_id"] for s in c["shares"] if s["rule"].startswith("winner_outcome")}
        assert named == {a for a, i in infos.items() if i["won"]}
        winners += len(named)
    assert winners > 0


@pytest.mark.parametrize("kw", [{}, {"reward_mode": "shared"}, {"continuous_actions": False}])
def test_retail_through_the_harness_charges_the_env_s_transfers(tmp_path, kw):
    env = Recording(retail_v0.parallel_env(max_cycles=10, **kw))
    credits = _run(env, RandomPolicy(env.env, seed=2), "retail_v0", tmp_path, **kw)
    assert _versions(credits) == {"retail/seed003-1"}
    moved = 0
    for c, infos in zip(credits, env.infos):
        for s in c["shares"]:
            i = infos[s["agent_id"]]
            assert ("+transfer_sent" in s["rule"]) == (i["sent"] > 0)
            if kw.get("reward_mode") != "shared":
                assert ("+transfer_received" in s["rule"]) == (i["received"] > 0)
            moved += i["sent"]
    assert (moved > 0) == kw.get("continuous_actions", True)


@pytest.mark.parametrize("policy", ["random", "heuristic"])
def test_banking_through_the_harness_splits_the_env_s_breaches(tmp_path, policy):
    env = Recording(banking_v0.parallel_env(max_cycles=25))
    pol = RandomPolicy(env.env, seed=7) if policy == "random" else HeuristicPolicy(env.env)
    credits = _run(env, pol, "banking_v0", tmp_path, episodes=3)
    assert _versions(credits) == {"banking/seed003-1"}
    breaches = 0
    for c, infos in zip(credits, env.infos):
        breach = next(iter(infos.values()))["risk_violation"]
        assert {s["rule"] for s in c["shares"]} == {"own_terms+portfolio_penalty_by_risk" if breach else "own_terms"}
        breaches += breach
    if policy == "random":
        assert breaches > 0
