"""The verifier's C fast path and its pure-Python definition agree on every input."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eventlog import fastpath
from tests.unit.test_verify import STREAM

CHAIN = [r.value for r in STREAM if r.key == "r1:actions"]


def test_native_build_is_used_on_this_machine():
    # the project's set-up has a C compiler; without one, the Python path runs (and this says so)
    assert fastpath.NATIVE, "C fast path failed to build: verification falls back to pure Python"


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_native_and_python_agree(data):
    values = list(CHAIN)
    op = data.draw(st.sampled_from(["none", "flip", "drop", "swap", "truncate", "empty"]))
    i = data.draw(st.integers(0, len(values) - 1))
    if op == "flip":
        v = bytearray(values[i])
        v[data.draw(st.integers(0, len(v) - 1))] ^= 0xFF
        values[i] = bytes(v)
    elif op == "drop":
        del values[i]
    elif op == "swap" and i + 1 < len(values):
        values[i], values[i + 1] = values[i + 1], values[i]
    elif op == "truncate":
        values[i] = values[i][:data.draw(st.integers(0, 80))]
    elif op == "empty":
        values = []
    want_leaves = data.draw(st.booleans())
    la, lb = (bytearray(), bytearray()) if want_leaves else (None, None)
    assert fastpath.check_chain(values, bytes(32), la) == fastpath.py_check_chain(values, bytes(32), lb)
    assert la == lb
    if want_leaves and la:
        n = len(la) // 32
        start = data.draw(st.integers(0, n - 1))
        count = data.draw(st.integers(1, n - start))
        assert fastpath.merkle_root_from_leaves(la, start, count) == fastpath.py_merkle_root_from_leaves(la, start, count)


def test_leaf_range_outside_buffer_is_refused():
    with pytest.raises(ValueError):
        fastpath.merkle_root_from_leaves(bytearray(64), 1, 2)
    with pytest.raises(ValueError):
        fastpath.py_merkle_root_from_leaves(bytearray(64), 1, 2)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=300))
def test_checkpoint_merkle_root_agrees_with_the_reference(hashes):
    from eventlog.checkpoint import _merkle_root
    from eventlog.merkle import merkle_root

    assert _merkle_root(hashes) == merkle_root(hashes)


@pytest.mark.parametrize("hashes", [[], [bytes(31)], [bytes(32), bytes(33)]])
def test_event_hash_root_refuses_what_is_not_a_list_of_hashes(hashes):
    for fn in (fastpath.merkle_root_of_event_hashes, fastpath.py_merkle_root_of_event_hashes):
        with pytest.raises(ValueError):
            fn(hashes)


def test_event_hash_root_takes_any_32_byte_buffer():
    hashes = [bytes(32), bytearray(b"\x01" * 32), memoryview(b"\x02" * 32)]
    assert fastpath.merkle_root_of_event_hashes(hashes) == fastpath.py_merkle_root_of_event_hashes(hashes)


class FakeMessage:
    """Stands in for a confluent-kafka Message (which cannot be constructed): the same methods."""

    def __init__(self, topic, key, value, partition=0, offset=0, err=None):
        self._t, self._k, self._v, self._p, self._o, self._e = topic, key, value, partition, offset, err

    def error(self):
        return self._e

    def topic(self):
        return self._t

    def key(self):
        return self._k

    def value(self):
        return self._v

    def partition(self):
        return self._p

    def offset(self):
        return self._o

    def timestamp(self):
        return (1, 0)


def _drive(group, msgs, chunk, untrack=None):
    """Feed ``msgs`` through ``group`` as Verifier.feed_messages does; log every stop and every
    emptied buffer (by the messages' identities)."""
    bufs, log, i = {}, [], 0
    while True:
        i, what, topic, key = group(msgs, i, bufs, chunk, untrack)
        log.append((i, what, topic, key))
        if what == fastpath.GROUP_DONE:
            break
        if what == fastpath.GROUP_ERROR:
            i += 1  # skip it, to exercise the resume from an index
        elif what == fastpath.GROUP_NEW_KEY:
            bufs.setdefault(topic, {})[key] = ([], [])
        else:
            ms, vs = bufs[topic][key]
            log.append(([id(m) for m in ms], vs))
            bufs[topic][key] = ([], [])
    rest = {(t, k): ([id(m) for m in ms], vs) for t, keys in bufs.items() for k, (ms, vs) in keys.items()}
    return log, rest


@settings(max_examples=120, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["p.a", "p.b"]), st.sampled_from([b"c1", b"c2", b"c3", None]),
                          st.binary(max_size=8), st.integers(0, 12)), max_size=60),
       st.integers(1, 5))
def test_native_and_python_grouping_agree(rows, chunk):
    msgs = [FakeMessage(t, k, v, err=("broken" if e == 0 else None)) for t, k, v, e in rows]
    assert _drive(fastpath.group_messages, msgs, chunk) == _drive(fastpath.py_group_messages, msgs, chunk)
    log, rest = _drive(fastpath.group_messages, msgs, chunk)
    # every message without an error lands exactly once, in its (topic, key) buffer, in order
    landed = [i for entry in log if isinstance(entry[0], list) for i in entry[0]]
    landed += [i for ms, _ in rest.values() for i in ms]
    assert sorted(landed) == sorted(id(m) for m in msgs if m.error() is None)


def test_native_grouping_takes_only_the_named_type_off_the_gc():
    import gc

    class Other(FakeMessage):
        pass

    a, b = FakeMessage("t", b"k", b"v"), Other("t", b"k", b"w")
    bufs = {"t": {b"k": ([], [])}}
    assert fastpath.group_messages([a, b], 0, bufs, 10, FakeMessage) == (2, fastpath.GROUP_DONE, None, None)
    assert bufs["t"][b"k"] == ([a, b], [b"v", b"w"])
    assert not gc.is_tracked(a) and gc.is_tracked(b)  # exactly the type: a subclass may hold cycles


def test_native_grouping_refuses_malformed_buffers():
    with pytest.raises(TypeError):
        fastpath.group_messages([FakeMessage("t", b"k", b"v")], 0, {"t": {b"k": [[], []]}}, 10)
    with pytest.raises(TypeError):
        fastpath.group_messages([FakeMessage("t", b"k", b"v")], 0, {"t": [1]}, 10)
