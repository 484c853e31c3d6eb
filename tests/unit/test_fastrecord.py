"""The harness's C step recorder (producers/_record.c) does what the Python reference functions of
``producers.harness.step_functions`` do: the same payloads handed to the same sealers in the same
order, the same return values, and the same exception, at the same point, for input it cannot take."""
import collections
import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import producers.harness as harness
from producers import fastrecord
from producers.spaces import float_view
from tests.native import require_built
from tests.unit.test_fast_sealing import harness_run


@pytest.fixture(autouse=True)
def _built():
    require_built(fastrecord.NATIVE, "the C step recorder", "producers/_record.c")


class Sealed:
    __slots__ = ("event_hash",)

    def __init__(self, h):
        self.event_hash = h


def plain(x):
    """A payload value in comparable form (arrays by dtype and content; identity does not matter)."""
    if isinstance(x, np.ndarray):
        return ("ndarray", str(x.dtype), x.shape, x.tobytes())
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x).__name__, [plain(v) for v in x]
    return type(x).__name__, repr(x)


def recorders(agents, discrete, fail_on=None):
    """(C recorder, Python recorder, each one's log of sealer calls)."""
    out = []
    for native in (True, False):
        calls = []

        def sealer(name, calls=calls):
            def seal(payload, sources):
                calls.append((name, plain(payload), plain(sources)))
                if fail_on is not None and name == fail_on:
                    raise RuntimeError(f"sink refused {name}")
                return Sealed(hashlib.sha256(repr(calls[-1]).encode()).digest())
            return seal

        obs = {a: sealer(f"obs:{a}") for a in agents}
        encode = {a: (lambda x: (int(x), [])) if discrete[a] else (lambda x: (-1, [float(v) for v in x]))
                  for a in agents}
        observe, joint_action = harness.step_functions(sealer("state"), obs, discrete, encode)
        rec = fastrecord.recorder(append_state=sealer("state"), append_obs=obs, append_action=sealer("action"),
                                  discrete=discrete, observe=observe, joint_action=joint_action,
                                  float_view=float_view, native=native)
        out.append((rec, calls))
    assert type(out[0][0]) is not fastrecord.PyRecorder and type(out[1][0]) is fastrecord.PyRecorder
    return out


def outcome(fn, *args):
    try:
        r = fn(*args)
        return "ok", plain(r)
    except Exception as exc:  # noqa: BLE001 - the comparison is the point
        return "error", type(exc), str(exc)


AGENTS = ["a0", "a1", "a2"]
numbers = st.one_of(st.floats(allow_nan=False), st.integers(-(1 << 70), 1 << 70), st.booleans(),
                    st.builds(np.float32, st.floats(width=32, allow_nan=False)), st.builds(np.int64, st.integers(-9, 9)),
                    st.sampled_from(["1.5", None, "x", b"2"]))
truths = st.one_of(st.booleans(), st.builds(np.bool_, st.booleans()), st.integers(0, 2), st.sampled_from([None, "", "y"]))
observations = st.one_of(
    st.builds(lambda n: np.arange(n, dtype=np.float32), st.integers(0, 5)),
    st.builds(lambda n: np.arange(n, dtype=np.float64), st.integers(0, 3)),
    st.builds(lambda n: np.arange(2 * n, dtype=np.float32).reshape(2, n), st.integers(1, 3)),
    st.lists(st.floats(width=32, allow_nan=False), max_size=3),
    st.sampled_from([None, "bad", np.arange(6, dtype=np.float32)[::2]]))
infos = st.one_of(st.just({}), st.dictionaries(st.sampled_from(AGENTS), st.one_of(
    st.just({}), st.fixed_dictionaries({"action_mask": st.one_of(st.none(), st.lists(st.booleans(), max_size=3))}),
    st.sampled_from([None, {"other": 1}])), max_size=3))


@settings(max_examples=400, deadline=None)
@given(data=st.data(), live=st.lists(st.sampled_from(AGENTS + ["zz"]), max_size=4, unique=True),
       discrete=st.fixed_dictionaries({a: st.booleans() for a in AGENTS}), cut=st.booleans(),
       ep_return=st.one_of(st.floats(allow_nan=False), st.integers(-3, 3)), fail_on=st.sampled_from([None, "state", "obs:a1", "action"]),
       flags=st.one_of(st.none(), st.lists(st.text(max_size=3), max_size=2)))
def test_the_c_recorder_does_what_the_reference_functions_do(data, live, discrete, cut, ep_return, fail_on, flags):
    (c_rec, c_calls), (py_rec, py_calls) = recorders(AGENTS, discrete, fail_on)
    obs = {a: data.draw(observations) for a in live if a != "zz" or data.draw(st.booleans())}
    info = data.draw(infos)
    state = np.arange(4, dtype=np.float32)
    args = (1, 2, state, state, flags, live, obs, info)
    got, want = outcome(c_rec.observe, *args), outcome(py_rec.observe, *args)
    assert got == want
    assert c_calls == py_calls
    sources = [bytes(32)] * 2
    actions = {a: data.draw(st.one_of(st.integers(0, 4), st.builds(np.int64, st.integers(0, 4)), st.floats(0, 3),
                                      st.lists(st.floats(-1, 1), min_size=1, max_size=2), st.sampled_from(["2", None])))
               for a in live if data.draw(st.integers(0, 9)) > 0}
    chosen = {a: data.draw(st.one_of(st.tuples(st.just(0), numbers), st.just([0, 0.5]), st.just((0,))))
              for a in live if data.draw(st.integers(0, 9)) > 0}
    rewards = {a: data.draw(numbers) for a in live if data.draw(st.booleans())}
    if data.draw(st.booleans()):  # MPE's rewards: .get() does not call the factory, [] would
        rewards = collections.defaultdict(lambda: "from the factory", rewards)
    terms = {a: data.draw(truths) for a in live if data.draw(st.booleans())}
    truncs = {a: data.draw(truths) for a in live if data.draw(st.booleans())}
    act_args = (1, 2, live, actions, chosen, rewards, terms, truncs, cut, sources, ep_return)
    got, want = outcome(c_rec.act, *act_args), outcome(py_rec.act, *act_args)
    assert got == want
    assert c_calls == py_calls


class OddTruth:
    def __bool__(self):
        raise ValueError("no truth value here")


@pytest.mark.parametrize("name,change", [
    ("reward not a number", lambda k: k["rewards"].update(a1="lots")),
    ("action not an int", lambda k: k["actions"].update(a1="left")),
    ("no action for a live agent", lambda k: k["actions"].pop("a2")),
    ("no choice for a live agent", lambda k: k["chosen"].pop("a0")),
    ("log_prob not a number", lambda k: k["chosen"].update(a2=(1, object()))),
    ("truncation without a truth value", lambda k: k["truncs"].update(a1=OddTruth())),
    ("action None", lambda k: k["actions"].update(a0=None)),
])
def test_a_bad_step_raises_where_the_reference_raises_and_seals_no_action(name, change):
    (c_rec, c_calls), (py_rec, py_calls) = recorders(AGENTS, {a: True for a in AGENTS})
    kw = {"actions": {"a0": 1, "a1": 2, "a2": 0}, "chosen": {a: (0, -0.5) for a in AGENTS},
          "rewards": {"a0": 1.0, "a1": np.float32(0.25), "a2": 3}, "terms": {"a0": False}, "truncs": {"a1": np.bool_(True)}}
    change(kw)
    args = (0, 5, list(AGENTS), kw["actions"], kw["chosen"], kw["rewards"], kw["terms"], kw["truncs"], False,
            [bytes(32)], 0.0)
    got, want = outcome(c_rec.act, *args), outcome(py_rec.act, *args)
    assert got == want and got[0] == "error", name
    assert c_calls == py_calls == []


def test_the_harness_takes_the_c_path_on_plain_envs_and_gives_the_reference_bytes(monkeypatch):
    from mpe2 import simple_spread_v3

    from producers.envs import sandbox_v0

    counted = {"observe": 0, "joint_action": 0}
    reference = harness.step_functions

    def counting(*args):
        observe, joint_action = reference(*args)

        def observe_counted(*a):
            counted["observe"] += 1
            return observe(*a)

        def joint_counted(*a):
            counted["joint_action"] += 1
            return joint_action(*a)
        return observe_counted, joint_counted

    monkeypatch.setattr(harness, "step_functions", counting)
    for factory in (lambda: simple_spread_v3.parallel_env(N=3, max_cycles=12, local_ratio=0.5),
                    lambda: sandbox_v0.parallel_env(n_sandboxes=3)):
        native, s1 = harness_run(factory, monkeypatch, 7, episodes=3)
        assert counted == {"observe": 0, "joint_action": 0}  # every step on the C path
        monkeypatch.setattr(fastrecord, "NATIVE", False)
        python, s2 = harness_run(factory, monkeypatch, 7, episodes=3)
        monkeypatch.setattr(fastrecord, "NATIVE", True)
        assert counted["observe"] == counted["joint_action"] == s2.steps > 0
        counted.update(observe=0, joint_action=0)
        assert native.sent == python.sent and s1 == s2
