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
