"""The main job (`marlgrc demo`): every part on one audited backbone, end to end.

1. producers: run ``mailbox_v0`` with the heuristic policy; raw identifiers are pseudonymized and
   encrypted at the boundary; every state, observation and joint action goes to Kafka;
2. stream processors: a real worker process scores each joint action (di.credit) and computes
   fairness metrics, exactly once;
3. ledger: materialize every topic into the encrypted SQLCipher ledger;
4. audit: verify the run's chains against the signed checkpoints, and the ledger on its own.
"""
from __future__ import annotations

import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from eventlog.audit import verify_kafka
from eventlog.checkpoint import Signer
from eventlog.kafka import EventProducer, ensure_topics, read_records
from eventlog.log import EventLog
from eventlog.privacy import FieldProtector, LocalKeyStore

from .config import Settings


@dataclass
class MainJobResult:
    run_id: str
    steps: int = 0
    events: int = 0
    mean_return: float = 0.0
    credits: int = 0
    ledger_rows: int = 0
    kafka_ok: bool = False
    ledger_ok: bool = False
    lines: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.kafka_ok and self.ledger_ok and self.credits == self.steps


def run_main_job(s: Settings, bootstrap: str, *, episodes: int = 3, seed: int = 0,
                 say: Callable[[str], None] = print, worker_timeout: float = 120.0) -> MainJobResult:
    """The demo on ``bootstrap`` under the topic prefix, signing key, key store and ledger of ``s``."""
    from ledger import SqliteLedger
    from ledger.keys import KeyFile
    from ledger.materialize import sync
    from ledger.verify import verify_ledger
    from producers.envs import mailbox_v0
    from producers.harness import run_episodes
    from producers.policies import builtin_policy

    prefix = s.prefix
    ensure_topics(bootstrap, prefix)
    signer = Signer.load_or_create(s.signing_key)
    run_id = f"mailbox_v0__heuristic__{seed}__{int(time.time())}__{uuid.uuid4().hex[:6]}"
    result = MainJobResult(run_id)

    # 1. producers
    env = mailbox_v0.parallel_env()
    producer = EventProducer(bootstrap, prefix=prefix, client_id="marlgrc-demo")
    log = EventLog(producer, run_id=run_id, producer_id="demo-harness", signer=signer, checkpoint_every=1000)
    with LocalKeyStore(s.keystore) as keys:
        summary = run_episodes(env, builtin_policy("heuristic", env, seed), log, episodes=episodes, seed=seed,
                               env_id="mailbox_v0", env_version="0", config={"demo": True},
                               protector=FieldProtector(keys))
    log.close()
    result.steps, result.events, result.mean_return = summary.steps, summary.events, summary.mean_return
    say(f"1/4 producers: run {run_id}: {summary.episodes} episodes, {summary.steps} steps, "
        f"{summary.events} events, mean return {summary.mean_return:.2f}")

    # 2. stream processors: a real worker process, stopped once every joint action is scored
    worker = subprocess.Popen([sys.executable, "-m", "stream_processors", "--bootstrap", bootstrap,
                               "--prefix", prefix, "--name", "demo-di",
                               "--signing-key", str(s.signing_key)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + worker_timeout
        while time.monotonic() < deadline:
            result.credits = sum(1 for r in read_records(bootstrap, ["marl.di.credit"], prefix=prefix)
                                 if r.key == f"{run_id}:credit")
            if result.credits >= summary.steps or worker.poll() is not None:
                break
            time.sleep(1.0)
    finally:
        worker.terminate()
        try:
            _, err = worker.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            _, err = worker.communicate()
    if result.credits < summary.steps:
        tail = "\n".join((err or "").strip().splitlines()[-5:])
        say(f"2/4 stream processors: only {result.credits} of {summary.steps} joint actions scored; worker said:\n{tail}")
    else:
        say(f"2/4 stream processors: {result.credits} credit assignments, one per joint action")

    # 3. ledger
    key = KeyFile(s.ledger_key) if s.ledger_key.exists() else KeyFile.create(s.ledger_key)
    s.ledger_file.parent.mkdir(parents=True, exist_ok=True)
    store = SqliteLedger(s.ledger_file, key)
    try:
        stats = sync(store, bootstrap, prefix=prefix)
        result.ledger_rows = getattr(stats, "events", 0) or sum(store.table_counts().values())
        say(f"3/4 ledger: {result.ledger_rows} rows materialized into {s.ledger_file} (SQLCipher)")
        lrep = verify_ledger(store, signer.public_key)
        result.ledger_ok = lrep.ok
    finally:
        store.close()

    # 4. audit
    report, _ = verify_kafka(bootstrap, prefix=prefix, run_id=run_id, public_key=signer.public_key)
    result.kafka_ok = report.ok
    for c in report.chains:
        result.lines.append(f"{c.topic:<26} {c.chain_id:<60} {c.events:>6} events  signed through seq "
                            f"{c.signed_through_seq:>5}  {c.first_break.describe() if c.first_break else 'ok'}")
    say(f"4/4 audit: {report.events} events in {len(report.chains)} chains "
        f"{'verify' if report.ok else 'DO NOT verify'}; ledger {'verifies' if lrep.ok else 'does NOT verify'}")
    return result
