"""The DI worker's committed state (marl.processor.state) read back at a restart: an entry it cannot
read stops it with StateCorrupt naming the entry and what to do, never a bare KeyError deep inside
(resuming without the entry would fork its runs' chains). Pure: no broker (``_restore_unit`` on the
entries the worker would have read)."""
import json

import pytest

from stream_processors.worker import StateCorrupt, Worker, WorkerConfig


def unit():
    w = Worker(WorkerConfig("127.0.0.1:1", "t.", "di"))
    return w, w.units[None]


@pytest.mark.parametrize("what,value", [
    ("offsets", b"not json"),
    ("offsets", json.dumps([["marl.env.state", "x", 3]]).encode()),
    ("offsets", json.dumps([["marl.env.state", 0]]).encode()),
    ("run:r1", b"\xff\x00 garbage"),
    ("run:r1", json.dumps({"unexpected": 1}).encode()),
    ("dlq", b"{"),
])
def test_an_unreadable_state_entry_is_state_corrupt_naming_it(what, value):
    w, u = unit()
    key = u.key_prefix + what
    with pytest.raises(StateCorrupt, match="cannot be read back") as exc:
        w._restore_unit(u, {key: value})
    assert repr(key) in str(exc.value) and "Restore marl.processor.state" in str(exc.value)


def test_readable_offsets_are_restored():
    w, u = unit()
    w._restore_unit(u, {u.key_prefix + "offsets": json.dumps([["marl.env.state", 2, 41]]).encode(),
                        u.key_prefix + "join:r1:a:00": None})
    assert u.offsets == {("marl.env.state", 2): 41}
