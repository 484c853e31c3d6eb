"""Prometheus metrics of the long-running commands that marlgrc wires: the harness (``marlgrc run``),
the on-policy learner (``marlgrc train-online``, ``marlgrc run --algo``) and the ledger sync
(``marlgrc ledger sync``). The processor worker (``marlgrc process``) keeps its own in
``stream_processors.worker.Metrics``, the faust fairness app in ``stream_processors.faust_fairness``;
this module follows their pattern: a registry of the process's own, names ``marlgrc_<part>_<what>``,
an HTTP endpoint on 127.0.0.1 only (``--metrics-port``).

The harness and the learner are observed here, at the wiring, through what they already hand out
(the harness's ``progress`` callback and the events it sends through its sink; the training loop's
``on_update`` rows; the ledger sync's ``on_batch`` and ``on_position``), so they stay free of any
metrics code. Counters are cumulative for the life of the process (``_total`` on the wire):
Prometheus turns them into rates, e.g. events/s = ``rate(marlgrc_harness_events_total[1m])``.

Ports the scrape config (``compose/prometheus.yml``) and the Grafana dashboard
(``compose/grafana/marlgrc.json``) expect, one process of each kind per machine (``PORTS``):

    marlgrc process                      9308   marlgrc_processor_*
    marlgrc process --faust-fairness     9309   marlgrc_fairness_faust_* (the child worker)
    marlgrc run --metrics-port 9310      9310   marlgrc_harness_*
    marlgrc train-online --metrics-port 9311   marlgrc_harness_* and marlgrc_learner_*
    marlgrc ledger sync --metrics-port 9312    marlgrc_ledger_*
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from .errors import fail

if TYPE_CHECKING:  # prometheus_client is imported by the commands that serve metrics, not by every command
    from prometheus_client import CollectorRegistry

PORTS = {"processor": 9308, "fairness-faust": 9309, "harness": 9310, "learner": 9311, "ledger": 9312}
"""Scrape job -> the port its command serves on in the documented setup (docs/OPERATIONS.md, Monitoring)."""

LIFECYCLE_TOPIC = "marl.run.lifecycle"


def metrics_port_option(job: str) -> Any:
    """The ``--metrics-port`` option of a long command, off by default (two runs on one machine would
    want the same port); its help names the port the scrape config expects for ``job``."""
    import typer

    return typer.Option(None, "--metrics-port", min=0,
                        help=f"serve Prometheus metrics on http://127.0.0.1:PORT/metrics while the command runs "
                             f"(compose/prometheus.yml scrapes {PORTS[job]}; default: none)")


def exporter(port: int | None) -> "CollectorRegistry | None":
    """A registry of this process's own, served on ``http://127.0.0.1:port/metrics``; None without a
    port (0 or None: no endpoint, and the commands then skip the metrics altogether)."""
    if not port:
        return None
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    try:
        start_http_server(port, addr="127.0.0.1", registry=registry)
    except OSError as exc:
        fail(f"cannot serve metrics on 127.0.0.1:{port} ({exc.strerror or exc}); pass a free --metrics-port "
             f"(0: none)")
    return registry


class HarnessMetrics:
    """What the producers' harness writes: env steps, events per topic, episodes and the last one's return."""

    def __init__(self, registry: "CollectorRegistry"):
        from prometheus_client import Counter, Gauge

        p = "marlgrc_harness"
        self.steps = Counter(f"{p}_steps", "environment steps taken", registry=registry)
        self.events = Counter(f"{p}_events", "events sealed and sent to Kafka", ["topic"], registry=registry)
        self.episodes = Counter(f"{p}_episodes", "episodes finished (episode.summary written)", registry=registry)
        self.last_return = Gauge(f"{p}_last_return", "team return of the last finished episode", registry=registry)
        self._by_topic: dict[str, Any] = {}
        self._codec = None

    def step(self, n: int = 1) -> None:
        """The harness's ``progress`` callback: ``n`` steps taken."""
        self.steps.inc(n)

    def sent(self, topic: str, value: bytes) -> None:
        """One event sent (``TappedSink``); an episode.summary also sets the last return."""
        child = self._by_topic.get(topic)
        if child is None:
            child = self._by_topic[topic] = self.events.labels(topic)
        child.inc()
        if topic == LIFECYCLE_TOPIC:  # a few events per episode: decoding them costs nothing
            if self._codec is None:
                from eventlog.codec import default_codec

                self._codec = default_codec()
            name, rec = self._codec.decode(value)
            if name == "episode_summary":
                self.episodes.inc()
                self.last_return.set(rec["episode_return"])


class LearnerMetrics:
    """What the on-policy learner does, from the training loop's ``on_update`` rows."""

    def __init__(self, registry: "CollectorRegistry"):
        from prometheus_client import Counter, Gauge

        p = "marlgrc_learner"
        self.updates = Counter(f"{p}_updates", "policy updates (each one a policy.update event)", registry=registry)
        self.env_steps = Counter(f"{p}_env_steps", "environment steps trained on", registry=registry)
        self.optimizer_steps = Counter(f"{p}_optimizer_steps", "optimizer steps taken", registry=registry)
        self.last_return = Gauge(f"{p}_last_return", "mean episodic team return of the last update's batch",
                                 registry=registry)
        self.loss = Gauge(f"{p}_loss", "the last update's losses", ["name"], registry=registry)
        self._seen = {"env_steps": 0, "optimizer_steps": 0}

    def update(self, row: dict) -> None:
        """One ``on_update`` row (``learners.online.train_online``): cumulative counts become increments."""
        self.updates.inc()
        for key, counter in (("env_steps", self.env_steps), ("optimizer_steps", self.optimizer_steps)):
            now = int(row.get(key, self._seen[key]))
            counter.inc(max(0, now - self._seen[key]))
            self._seen[key] = now
        self.last_return.set(row["charts/episodic_return"])
        for key, value in row.items():
            if key.startswith("losses/") and isinstance(value, (int, float)):
                self.loss.labels(key[len("losses/"):]).set(value)


class LedgerSyncMetrics:
    """What ``ledger sync`` materializes, from its ``on_batch`` stats and ``on_position`` lag."""

    def __init__(self, registry: "CollectorRegistry"):
        from prometheus_client import Counter, Gauge

        from eventlog.verify import BreakKind
        from ledger.ingest import IngestKind

        p = "marlgrc_ledger"
        self.events = Counter(f"{p}_events_ingested", "events materialized into the ledger", registry=registry)
        self.batches = Counter(f"{p}_transactions", "ingest transactions committed", registry=registry)
        self.findings = Counter(f"{p}_integrity_findings", "integrity findings met while ingesting (chain "
                                "breaks and undecodable events): verification breaks", ["kind"], registry=registry)
        self.deletions = Counter(f"{p}_deletions_applied", "compliance.deletion events applied", registry=registry)
        self.erased = Counter(f"{p}_erased_rows", "rows of erased subjects deleted with evidence", registry=registry)
        self.lag = Gauge(f"{p}_consumer_lag", "topic end offset - the ledger's stored offset",
                         ["topic", "partition"], registry=registry)
        for kind in [*BreakKind, *IngestKind]:  # every kind at 0, so a rate exists before the first break
            self.findings.labels(kind.value)
        self._stats: Any = None
        self._seen = (0, 0, 0, 0, 0)

    def batch(self, stats: Any) -> None:
        """``ledger.sync``'s ``on_batch``: ``stats`` (``ledger.IngestStats``) counts since the start of
        the current read round, a new object each round, so increments are taken against the counts
        of the last call with the same object."""
        if stats is not self._stats:  # the object is held here, so an identity test is safe
            self._stats, self._seen = stats, (0, 0, 0, 0, 0)
        records, batches, findings, deletions, erased = self._seen
        self.events.inc(stats.records - records)
        self.batches.inc(stats.batches - batches)
        for f in stats.findings[findings:]:
            self.findings.labels(f.kind).inc()
        self.deletions.inc(len(stats.deletions) - deletions)
        self.erased.inc(stats.erased_rows - erased)
        self._seen = (stats.records, stats.batches, len(stats.findings), len(stats.deletions), stats.erased_rows)

    def set_lag(self, lag: dict[tuple[str, int], int]) -> None:
        for (topic, partition), n in lag.items():
            self.lag.labels(topic, str(partition)).set(n)


class TappedSink:
    """An ``eventlog.log.Sink`` that sends every event on to ``sink`` and then tells ``tap(topic, value)``;
    anything else (``flush``, ``close``, ``sent``) is the wrapped sink's."""

    def __init__(self, sink: Any, tap: Callable[[str, bytes], None]):
        self._sink, self._tap = sink, tap

    def send(self, topic: str, key: str, value: bytes) -> None:
        self._sink.send(topic, key, value)
        self._tap(topic, value)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sink, name)
