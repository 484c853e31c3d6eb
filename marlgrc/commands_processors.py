"""CLI: ``marlgrc process`` (the live decision interpreter + fairness worker) and
``marlgrc reprocess --run R`` (the same pure functions over a replayed range)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer

from .config import BootOpt, HomeOpt, PrefixOpt, Settings
from .errors import fail
from .progress import Backlog, ProgressOpt, console, counted, progress_bar


def _start_faust_fairness(bootstrap: str, prefix: str, metrics_port: int, signing_key: Path):
    """The faust fairness app as a child ``faust worker`` process (faust owns its event loop), signing
    its chains with ``signing_key``."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "MARLGRC_BOOTSTRAP": bootstrap, "MARLGRC_TOPIC_PREFIX": prefix,
           "MARLGRC_METRICS_PORT": str(metrics_port or 0), "MARLGRC_SIGNING_KEY": str(signing_key),
           "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)}
    console.print("starting the faust fairness app (stream_processors.faust_fairness)"
                  + (f"; metrics on http://127.0.0.1:{metrics_port}/metrics" if metrics_port else ""))
    return subprocess.Popen([sys.executable, "-m", "stream_processors.faust_fairness", "worker", "-l", "warn"],
                            env=env)


def _stop_child(child) -> None:
    import subprocess

    if child.poll() is None:
        child.terminate()
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()


def register(app: typer.Typer) -> None:
    @app.command()
    def process(
        name: str = typer.Option("di", help="worker name: its transactional id, consumer group and state keys"),
        metrics_port: Optional[int] = typer.Option(9308, help="Prometheus port on 127.0.0.1 (0: none)"),
        default_env: str = typer.Option("passthrough", help="rule set for envs without their own"),
        batch: int = typer.Option(2000, help="input records per transaction, at most"),
        faust_fairness: bool = typer.Option(False, "--faust-fairness", help="also run the faust-streaming "
                                            "fairness app (marl.di.credit -> {run}:fairness:faust:*, exactly once) "
                                            "as a child worker process; its metrics on --metrics-port + 1"),
        group: bool = typer.Option(False, "--group", help="scale out: join the consumer group of --name; every "
                                   "process started with the same --name and --group takes a share of the "
                                   "partition numbers (state, dead-letter chain and transactional id per partition "
                                   "number), and a killed one's share moves to the others"),
        session_timeout: float = typer.Option(10.0, help="with --group: seconds a silent member keeps its "
                                              "partitions before the group moves them (broker minimum 6)"),
        home: Optional[Path] = HomeOpt, bootstrap: Optional[str] = BootOpt, prefix: Optional[str] = PrefixOpt,
    ) -> None:
        """Run the decision interpreter and fairness metrics, exactly once, until Ctrl-C."""
        from confluent_kafka import KafkaException

        from eventlog.checkpoint import Signer
        from eventlog.kafka import BrokerUnavailable, ensure_topics
        from stream_processors.rules import RULE_SETS
        from stream_processors.worker import WorkerConfig, serve

        if default_env not in RULE_SETS:
            fail(f"--default-env {default_env!r} is not a rule set; use one of {sorted(RULE_SETS)}")
        if group and not 6 <= session_timeout <= 300:
            fail(f"--session-timeout {session_timeout:g} is outside the broker's default range of 6 to 300 "
                 f"seconds (group.min/max.session.timeout.ms)")
        s = Settings.load(home=home, bootstrap=bootstrap, prefix=prefix)
        boot = s.resolve_bootstrap()
        try:
            ensure_topics(boot, s.prefix)
        except BrokerUnavailable as exc:
            fail(str(exc))
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        console.print(f"processing {s.prefix or ''}marl.* on {boot} as {name!r}"
                      + (" (a member of its group: partitions shared with every --group process of that name)"
                         if group else "")
                      + (f"; metrics on http://127.0.0.1:{metrics_port}/metrics" if metrics_port else ""))
        signing_key = s.signing_key
        Signer.load_or_create(signing_key)   # the producers' key: one key for auditors to pin
        child = _start_faust_fairness(boot, s.prefix, (metrics_port + 1) if metrics_port else 0, signing_key) \
            if faust_fairness else None
        try:
            serve(WorkerConfig(boot, s.prefix, name, batch, default_env=default_env,
                               metrics_port=metrics_port or None, signing_key=str(signing_key), group=group,
                               session_timeout_ms=int(session_timeout * 1000)))
        except (KafkaException, OSError, RuntimeError) as exc:  # MixedModes, WorkerStuck, StateTooLarge
            fail(f"processor {name!r} stopped: {exc}", 1)
        finally:
            if child is not None:
                _stop_child(child)

    @app.command()
    def reprocess(
        run: str = typer.Option(..., "--run", help="run id to replay"),
        rules: Optional[str] = typer.Option(None, help="apply this rule set to the run instead of its env's"),
        default_env: str = typer.Option("passthrough", help="rule set for envs without their own"),
        since_ms: Optional[int] = typer.Option(None, help="replay from this timestamp (ms) instead of the start"),
        write: bool = typer.Option(False, "--write", help="send the results to Kafka on chains "
                                   "{run}:credit:reprocess:<rules> / {run}:fairness:reprocess:<rules>"),
        out: Optional[Path] = typer.Option(None, "--out", help="write the results as JSON lines here"),
        progress: bool = ProgressOpt,
        home: Optional[Path] = HomeOpt, bootstrap: Optional[str] = BootOpt, prefix: Optional[str] = PrefixOpt,
    ) -> None:
        """Apply the rules to a run's replayed joint actions; same input and rule version give the
        live processor's outputs."""
        from eventlog.checkpoint import Signer
        from eventlog.kafka import BrokerUnavailable, DeliveryError, EventProducer
        from stream_processors.processor import INPUT_TOPICS
        from stream_processors.replay import payload_fields, reprocess as replay
        from stream_processors.rules import RULE_SETS

        for r in (rules, default_env):
            if r is not None and r not in RULE_SETS:
                fail(f"{r!r} is not a rule set; use one of {sorted(RULE_SETS)}")
        s = Settings.load(home=home, bootstrap=bootstrap, prefix=prefix)
        tag = f"reprocess:{rules or 'env'}"
        boot = s.resolve_bootstrap()
        try:
            with progress_bar(f"replaying the input topics through the {rules or 'env'} rules for run {run}",
                              unit="records", enabled=progress) as bar:
                if bar.shown and since_ms is None:  # from the beginning: every offset is read
                    backlog = Backlog(boot, INPUT_TOPICS, s.prefix)
                    bar.update(total=backlog.total())
                    backlog.close()
                events = replay(boot, run, prefix=s.prefix, rules_override=rules, default_env=default_env,
                                credit_stream=f"credit:{tag}" if write else "credit",
                                fairness_stream=f"fairness:{tag}" if write else "fairness",
                                start_timestamp_ms=since_ms,
                                signer=Signer.load_or_create(s.signing_key) if write else None,
                                progress=bar.advance)
                bar.finish()
        except (BrokerUnavailable, KeyError) as exc:
            fail(str(exc).strip("'\""))
        if not any(e.topic == "marl.di.credit" for e in events):
            fail(f"run {run!r} has no joint actions that could be scored under prefix {s.prefix!r}; "
                  f"check the run id (`marlgrc verify --run {run}` lists its chains)", 1)
        if out is not None:
            with out.open("w") as fh:
                for e in events:
                    fh.write(json.dumps({"topic": e.topic, "chain_id": e.chain_id, "seq": e.seq,
                                         "payload": payload_fields(e.value)}, default=lambda b: b.hex()) + "\n")
        if write:
            sink = EventProducer(boot, prefix=s.prefix)
            try:
                with progress_bar(f"writing the results to {boot}", len(events), unit="events",
                                  enabled=progress) as bar:
                    for e in counted(events, bar):
                        sink.send(e.topic, e.chain_id, e.value)
                    sink.flush()
            except DeliveryError as exc:
                fail(str(exc), 1)
        counts: dict[str, int] = {}
        for e in events:
            counts[e.event_type] = counts.get(e.event_type, 0) + 1
        print(json.dumps({"run": run, "events": counts, "written": write, "out": str(out) if out else None}))
