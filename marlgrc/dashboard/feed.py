"""The dashboard's Kafka side: tail every topic into the fold, re-verify the topics when they moved.

Two threads, both read-only (consumers and metadata requests; no producer, no offsets committed):

- the tail reads every ``marl.*`` topic under the prefix from its beginning with one
  ``eventlog.kafka.OffsetReader``, a bounded chunk at a time, and folds what it read into the
  ``DashboardState``; once at the end it asks again every ``poll`` seconds;
- the verifier runs ``eventlog.audit.verify_kafka`` (what ``marlgrc verify`` runs) over the topics
  whenever the tail saw them move, and hands the report to the state. Each chain's verdict is the
  one ``marlgrc verify --run R`` gives for it: a chain is checked alone against the checkpoints of
  its own chain id. A pass reads the topics again, so the next one waits three times as long as the
  last took (at least ``verify_every`` seconds): verification takes at most a quarter of the time.

A broker that goes away, or topics that do not exist yet, are shown on the page and retried.
"""
from __future__ import annotations

import json
import threading
import time
from typing import Any

from confluent_kafka import KafkaException

import schemas as schema_files
from eventlog.audit import verify_kafka
from eventlog.kafka import BrokerUnavailable, OffsetReader

from .state import DashboardState

CHUNK = 20_000          # records per partition per read while catching up


class Feed:
    """The live state of one deployment (bootstrap + topic prefix), kept by two daemon threads."""

    def __init__(self, bootstrap: str, prefix: str = "", public_key: Any = None, *, poll: float = 0.25,
                 verify_every: float = 2.0, chunk: int = CHUNK):
        self.bootstrap, self.prefix, self.public_key = bootstrap, prefix, public_key
        self.poll, self.verify_every, self.chunk = poll, verify_every, chunk
        self.state = DashboardState()
        self.lock = threading.Lock()
        self.tail_error: str | None = None
        self.verify_error: str | None = None
        self.verifying = False
        self._ends: dict[tuple[str, int], int] = {}        # end offsets the tail last saw
        self._position: dict[tuple[str, int], int] = {}    # next offset the tail reads
        self._meta = 0                                     # bumps when errors or progress change
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._cache: dict[tuple, bytes] = {}

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "Feed":
        for target, name in ((self._tail, "dashboard-tail"), (self._verify, "dashboard-verify")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)

    # --- what the server asks ----------------------------------------------------------------
    @property
    def version(self) -> tuple[int, int]:
        return self.state.version, self._meta

    @property
    def behind(self) -> int:
        """Records written that the tail has not read yet (as of its last look at the end offsets)."""
        return sum(max(0, e - self._position.get(k, 0)) for k, e in self._ends.items())

    def snapshot(self, run_id: str | None = None) -> dict:
        with self.lock:
            snap = self.state.snapshot(run_id)
        snap["meta"] = {"bootstrap": self.bootstrap, "prefix": self.prefix, "behind": self.behind,
                        "tail_error": self.tail_error, "verify_error": self.verify_error,
                        "verifying": self.verifying, "public_key": self.public_key is not None,
                        "now": time.time()}
        return snap

    def snapshot_json(self, run_id: str | None = None) -> bytes:
        """The snapshot as JSON bytes, built once per state version and run."""
        key = (self.version, run_id)
        body = self._cache.get(key)
        if body is None:
            body = json.dumps(self.snapshot(run_id), allow_nan=False, separators=(",", ":")).encode()
            if len(self._cache) > 16:
                self._cache.clear()
            self._cache[key] = body
        return body

    # --- the threads -------------------------------------------------------------------------
    def _set(self, attr: str, value: Any) -> None:
        if getattr(self, attr) != value:
            setattr(self, attr, value)
            self._meta += 1

    def _tail(self) -> None:
        reader: OffsetReader | None = None
        while not self._stop.is_set():
            try:
                if reader is None:
                    reader = OffsetReader(self.bootstrap, schema_files.TOPICS, self.prefix)
                ends = reader.end_offsets()
                start = {k: self._position.get(k, 0) for k in ends}
                upto = {k: min(e, start[k] + self.chunk) for k, e in ends.items()}
                records = reader.read(start, upto)
                with self.lock:
                    self.state.apply(records)
                    self._position.update(upto)
                    self._ends = ends
                self._set("tail_error", None)
                if upto == ends:
                    self._stop.wait(self.poll)
            except (BrokerUnavailable, KeyError, KafkaException, RuntimeError) as exc:
                self._set("tail_error", f"reading {self.prefix or ''}marl.* from {self.bootstrap}: "
                                        f"{str(exc).strip(chr(34) + chr(39))}; retrying")
                if reader is not None:
                    try:
                        reader.close()
                    except Exception:  # noqa: BLE001 - a broken consumer: drop it, make a new one
                        pass
                    reader = None
                self._stop.wait(2.0)
        if reader is not None:
            reader.close()

    def _verify(self) -> None:
        verified_ends: dict | None = None
        while not self._stop.is_set():
            ends = dict(self._ends)
            if not ends or ends == verified_ends:
                self._stop.wait(self.poll)
                continue
            self._set("verifying", True)
            t0 = time.monotonic()
            try:
                report, _ = verify_kafka(self.bootstrap, prefix=self.prefix, public_key=self.public_key)
            except (BrokerUnavailable, KeyError, KafkaException, RuntimeError) as exc:
                self._set("verify_error", f"verification could not read the topics: "
                                          f"{str(exc).strip(chr(34) + chr(39))}; retrying")
                self._set("verifying", False)
                self._stop.wait(2.0)
                continue
            took = time.monotonic() - t0
            with self.lock:
                self.state.apply_report(report, at=time.time(), seconds=took)
            verified_ends = ends
            self._set("verify_error", None)
            self._set("verifying", False)
            self._stop.wait(max(self.verify_every, 3 * took))
