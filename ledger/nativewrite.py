"""The ledger's batch writer in C (``ledger/_rowwrite.c``): one transaction's inserts and its COMMIT
run on a thread that never holds the GIL, so the next batch is read from Kafka and checked on the
other core meanwhile.

``attach(conn, path)`` gives a ``Writer`` for a sqlcipher3 connection (SQLite's extension loading
hands the C module the connection's handle; loading is switched off again at once), or None where
that cannot work: native code off or not compiled, a sqlite3 module without extension loading (the
standard library's build here), or a handle that does not check out. Callers then write with
``executemany``; the rows and the transaction are the same either way (tests/unit/test_nativewrite.py).
"""
from __future__ import annotations

import importlib
import logging
import os
import threading
from pathlib import Path

from eventlog.native import build_extension

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_rowwrite.c")
_module = None
_built = False
_lock = threading.Lock()  # one extension load at a time: the C side hands over the last loaded handle


def module():
    """The compiled ``_rowwrite`` module, or None."""
    global _module, _built
    with _lock:
        if not _built:
            _module = build_extension(SOURCE, "_rowwrite", purpose="the ledger's batch writer")
            _built = True
    return _module


def attach(conn, path: Path):
    """A ``_rowwrite.Writer`` on ``conn`` (whose main database is the file ``path``), or None."""
    mod = module()
    if mod is None or not hasattr(conn, "enable_load_extension"):
        return None
    with _lock:
        try:
            # the compiled module of the DB-API package the connection comes from (sqlcipher3._sqlite3)
            library = importlib.import_module(type(conn).__module__.rsplit(".", 1)[0] + "._sqlite3")
            conn.enable_load_extension(True)
            try:
                conn.load_extension(mod.__file__)
            finally:
                conn.enable_load_extension(False)
            return mod.take_loaded(library.__file__, os.path.realpath(path))
        except Exception as exc:  # noqa: BLE001 - any failure here only means the slower path
            log.warning("ledger %s: the C batch writer is unavailable (%s); writing with executemany", path, exc)
            return None


def write_error():
    """The C module's error class (``args``: SQLite's extended result code, its message, the index of the
    failing statement or -1 for BEGIN/COMMIT), or None without the module."""
    mod = module()
    return mod.WriteError if mod is not None else None
