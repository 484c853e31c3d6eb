"""The main job (`marlgrc demo`): the project's story end to end, on one audited backbone.

1. producers: run ``mailbox_v0`` with a random behaviour policy for N episodes (seeds S..S+N-1); raw
   identifiers are pseudonymized and encrypted at the boundary; every state, observation and joint
   action goes to Kafka, signed;
2. stream processors: a real worker process scores each joint action (di.credit) and computes the
   fairness metrics, exactly once;
3. learners: retrain from the run's topics as `marlgrc train --algo dqn` does (the same functions:
   ``learners.replay.read_kafka``, a verified replay; ``learners.offline.train_offline``, whose
   ``policy.update`` events name the exact event ranges learned from; ``save_checkpoint``, signed),
   then load the policy back from its signed checkpoint;
4. producers again: act with the trained policy (greedy) on N fresh inboxes (seeds S+N..S+2N-1), a
   second run whose joint actions carry the trained policy's version; the worker scores it too;
5. ledger: materialize both runs into the encrypted SQLCipher ledger and verify it on its own bytes;
6. audit: verify both runs' chains against their signed checkpoints; write each run's HTML report.

It ends with where to look and the summary: the mean team return per episode before training (the
random behaviour run) and after (the trained run), beside the random and heuristic policies on the
trained run's very inboxes (no events written), so what is compared is said, not implied.

Why DQN: it is off-policy, so learning from a random behaviour policy's recorded transitions is
correct (MAPPO and IPPO would need their own policy's actions). Why random behaviour: its data covers
every action, including the bad ones, so the learner sees what each costs. On mailbox_v0 each agent's
reward depends on its own action and the hidden maliciousness of the item, which its observation
hints at. The learner is rewarded with what the decision interpreter credited each agent (the
replay's rewards are the di.credit shares where the worker scored a step). 20 episodes (1,200 agent
transitions) and 5 updates move the mean team return from the random policy's -4.6 / -5.3 / -7.8 to
the trained policy's 14.4 / 13.6 / 16.1 on unseen inboxes (seeds 0 / 1 / 2; the env's heuristic rule
scores about 16 there); README.md shows the output.
"""
from __future__ import annotations

import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from eventlog.audit import verify_kafka
from eventlog.checkpoint import Signer
from eventlog.codec import default_codec
from eventlog.kafka import EventProducer, ensure_topics, read_records
from eventlog.log import EventLog
from eventlog.privacy import FieldProtector, LocalKeyStore

from .config import Settings

ENV_ID = "mailbox_v0"
ALGO = "dqn"


@dataclass
class RunOutcome:
    """One run of the demo: what the harness wrote, what the worker scored, how it verified."""

    run_id: str
    policy_version: str
    seeds: tuple[int, int]          # first and last env seed
    episodes: int = 0
    steps: int = 0
    events: int = 0
    mean_return: float = 0.0
    credits: int = 0
    kafka_ok: bool = False
    report: Path | None = None
    lines: list[str] = field(default_factory=list)


@dataclass
class Training:
    """What the retraining from run 1's topics did."""

    verified: bool = False
    episodes: int = 0
    env_steps: int = 0
    updates: int = 0
    optimizer_steps: int = 0
    policy_version: str = ""
    policy_update_hash: str = ""
    lineage: list[dict] = field(default_factory=list)
    checkpoint: Path | None = None


@dataclass
class MainJobResult:
    behaviour: RunOutcome
    trained: RunOutcome | None = None
    training: Training = field(default_factory=Training)
    random_reference: float = float("nan")     # the random policy on the trained run's inboxes
    heuristic_reference: float = float("nan")  # the env's heuristic on the same inboxes
    ledger_rows: int = 0
    ledger_ok: bool = False
    lines: list[str] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        return self.behaviour.run_id

    @property
    def runs(self) -> list[RunOutcome]:
        return [r for r in (self.behaviour, self.trained) if r is not None]

    @property
    def before(self) -> float:
        return self.behaviour.mean_return

    @property
    def after(self) -> float:
        return self.trained.mean_return if self.trained else float("nan")

    def run_ok(self, run: RunOutcome) -> bool:
        return run.kafka_ok and self.ledger_ok and run.credits == run.steps

    @property
    def ok(self) -> bool:
        return self.trained is not None and all(self.run_ok(r) for r in self.runs)


class _Worker:
    """The stream processor worker process, polled until it has scored a run's joint actions."""

    def __init__(self, s: Settings, bootstrap: str):
        self.bootstrap, self.prefix = bootstrap, s.prefix
        self.proc = subprocess.Popen([sys.executable, "-m", "stream_processors", "--bootstrap", bootstrap,
                                      "--prefix", s.prefix, "--name", "demo-di", "--signing-key", str(s.signing_key)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.err = ""

    def wait_scored(self, run: RunOutcome, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            run.credits = sum(1 for r in read_records(self.bootstrap, ["marl.di.credit"], prefix=self.prefix)
                              if r.key == f"{run.run_id}:credit")
            if run.credits >= run.steps or self.proc.poll() is not None or time.monotonic() > deadline:
                return
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            _, self.err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, self.err = self.proc.communicate()

    def scored_line(self, step: str, run: RunOutcome) -> str:
        if run.credits >= run.steps:
            return (f"{step} stream processors: {run.credits} credit assignments for run {run.run_id}, one per "
                    f"joint action")
        return f"{step} stream processors: only {run.credits} of {run.steps} joint actions of {run.run_id} scored"

    def complaint(self) -> str:
        """The worker's last words on stderr (after ``stop``), for a run it did not finish scoring."""
        tail = "\n".join((self.err or "").strip().splitlines()[-5:])
        return f"the stream processor worker said:\n{tail}" if tail else "the stream processor worker said nothing"


def _act(s: Settings, bootstrap: str, signer: Signer, policy, run: RunOutcome, *, episodes: int, seed: int,
         config: dict) -> None:
    """One run of mailbox_v0 with ``policy`` through the harness to Kafka (personal data protected)."""
    from producers.envs import make_env
    from producers.harness import run_episodes

    env, env_id, version = make_env(ENV_ID)
    producer = EventProducer(bootstrap, prefix=s.prefix, client_id="marlgrc-demo")
    log = EventLog(producer, run_id=run.run_id, producer_id="demo-harness", signer=signer, checkpoint_every=1000)
    with LocalKeyStore(s.keystore) as keys:
        summary = run_episodes(env, policy, log, episodes=episodes, seed=seed, env_id=env_id, env_version=version,
                               config={"demo": True, **config}, protector=FieldProtector(keys))
    log.close()
    run.episodes, run.steps, run.events, run.mean_return = (summary.episodes, summary.steps, summary.events,
                                                            summary.mean_return)


def _retrain(s: Settings, bootstrap: str, signer: Signer, run_id: str, *, seed: int, updates: int) -> tuple:
    """`marlgrc train --run RUN --algo dqn --updates U` on the demo's broker: verified replay, lineage on
    the policy chain, a signed checkpoint; returns (Training, the learner loaded back from it)."""
    from learners.checkpoint import learner_from_checkpoint, load_signing_key, save_checkpoint
    from learners.offline import train_offline
    from learners.replay import read_kafka

    replay = read_kafka(bootstrap, run_id, prefix=s.prefix, public_key=signer.public_key)
    producer = EventProducer(bootstrap, prefix=s.prefix, client_id="marlgrc-demo-train")
    log = EventLog(producer, run_id=run_id, producer_id=f"learner-{ALGO}-{uuid.uuid4().hex[:8]}", signer=signer)
    learner, events = train_offline(replay, ALGO, log=log, seed=seed, updates=updates)
    log.close()
    base = s.checkpoints / f"{run_id}__{ALGO}__{seed}" / "policy"
    save_checkpoint(base, learner, load_signing_key(s.signing_key))
    last = events[-1]
    _, payload = default_codec().decode(last.value)  # the lineage exactly as the event carries it
    t = Training(replay.verified, len(replay.episodes), replay.env_steps, len(events), learner.optimizer_steps,
                 learner.version, last.event_hash.hex(), list(payload["lineage"]), base)
    return t, learner_from_checkpoint(base, signer.public_key)  # what acts is what was signed


def run_main_job(s: Settings, bootstrap: str, *, episodes: int = 20, seed: int = 0, updates: int = 5,
                 say: Callable[[str], None] = print, worker_timeout: float = 120.0) -> MainJobResult:
    """The demo on ``bootstrap`` under the topic prefix, signing key, key store and ledger of ``s``:
    ``episodes`` random episodes, ``updates`` DQN updates from their topics, ``episodes`` trained ones."""
    import torch

    from learners.evaluate import GreedyPolicy, evaluate
    from ledger import SqliteLedger
    from ledger.keys import KeyFile
    from ledger.materialize import sync
    from ledger.report_html import write_html_report
    from ledger.verify import verify_ledger
    from producers.envs import make_env
    from producers.policies import HeuristicPolicy, RandomPolicy

    torch.set_num_threads(1)
    ensure_topics(bootstrap, s.prefix)
    signer = Signer.load_or_create(s.signing_key)
    stamp = f"{int(time.time())}__{uuid.uuid4().hex[:6]}"
    behaviour = RunOutcome(f"{ENV_ID}__random__{seed}__{stamp}", RandomPolicy.version, (seed, seed + episodes - 1))
    result = MainJobResult(behaviour)
    worker = _Worker(s, bootstrap)  # scores the runs live, as they are written
    try:
        # 1. producers: the behaviour run
        env, _, _ = make_env(ENV_ID)
        _act(s, bootstrap, signer, RandomPolicy(env, seed), behaviour, episodes=episodes, seed=seed, config={})
        say(f"1/6 producers: run {behaviour.run_id}: random behaviour policy, {behaviour.episodes} episodes "
            f"(seeds {seed}..{seed + episodes - 1}), {behaviour.steps} steps, {behaviour.events} events, "
            f"mean team return {behaviour.mean_return:.2f}")
        # 2. stream processors
        worker.wait_scored(behaviour, worker_timeout)
        say(worker.scored_line("2/6", behaviour))

        # 3. learners: retrain from the run's topics
        t, learner = _retrain(s, bootstrap, signer, behaviour.run_id, seed=seed, updates=updates)
        result.training = t
        transitions = t.env_steps * len(learner.spec.agents)
        learned = (f"{t.optimizer_steps} optimizer steps" if t.optimizer_steps else
                   f"0 optimizer steps: {transitions} agent transitions are fewer than DQN's learning_starts "
                   f"({learner.config.learning_starts}); give the demo --episodes 20 or more to learn")
        say(f"3/6 learners: verified replay of {behaviour.run_id} (verified={t.verified}): {t.episodes} episodes, "
            f"{t.env_steps} steps; {ALGO} {t.updates} updates, {learned}; policy {t.policy_version}; "
            f"{t.updates} policy.update events naming {len(t.lineage)} chain ranges; signed checkpoint "
            f"{t.checkpoint}.pt")

        # 4. producers: act with the trained policy on fresh inboxes
        policy = GreedyPolicy(learner)
        seed2 = seed + episodes
        trained = RunOutcome(f"{ENV_ID}__{ALGO}__{seed}__{stamp}", policy.version, (seed2, seed2 + episodes - 1))
        result.trained = trained
        _act(s, bootstrap, signer, policy, trained, episodes=episodes, seed=seed2,
             config={"trained_from_run": behaviour.run_id, "policy_update_event_hash": t.policy_update_hash})
        say(f"4/6 producers: run {trained.run_id}: trained policy {policy.version}, {trained.episodes} episodes on "
            f"fresh inboxes (seeds {seed2}..{seed2 + episodes - 1}), {trained.steps} steps, mean team return "
            f"{trained.mean_return:.2f}")
        worker.wait_scored(trained, worker_timeout)
        say(worker.scored_line("4/6", trained))
    finally:
        worker.stop()
    if any(r.credits < r.steps for r in result.runs):
        say(worker.complaint())
    ref_env, _, _ = make_env(ENV_ID)
    result.random_reference = evaluate(ref_env, RandomPolicy(ref_env, seed), episodes, seed=seed + episodes)
    result.heuristic_reference = evaluate(ref_env, HeuristicPolicy(ref_env), episodes, seed=seed + episodes)

    # 5. ledger
    key = KeyFile(s.ledger_key) if s.ledger_key.exists() else KeyFile.create(s.ledger_key)
    s.ledger_file.parent.mkdir(parents=True, exist_ok=True)
    store = SqliteLedger(s.ledger_file, key)
    try:
        stats = sync(store, bootstrap, prefix=s.prefix)
        result.ledger_rows = getattr(stats, "events", 0) or sum(store.table_counts().values())
        lrep = verify_ledger(store, signer.public_key)
        result.ledger_ok = lrep.ok
        say(f"5/6 ledger: {result.ledger_rows} rows materialized into {s.ledger_file} (SQLCipher); the ledger "
            f"{'verifies' if lrep.ok else 'does NOT verify'} on its stored bytes")
        # 6. audit, and each run's report from the ledger
        for run in result.runs:
            report, _ = verify_kafka(bootstrap, prefix=s.prefix, run_id=run.run_id, public_key=signer.public_key)
            run.kafka_ok = report.ok
            run.lines = [f"{c.topic:<26} {c.chain_id:<62} {c.events:>6} events  signed through seq "
                         f"{c.signed_through_seq:>5}  {c.first_break.describe() if c.first_break else 'ok'}"
                         for c in report.chains]
            result.lines += run.lines
            run.report = write_html_report(store, run.run_id, s.reports / run.run_id / "report.html",
                                           signer.public_key).path
            say(f"6/6 audit: run {run.run_id}: {report.events} events in {len(report.chains)} chains "
                f"{'verify' if report.ok else 'DO NOT verify'} against the signed checkpoints")
    finally:
        store.close()
    return result


def where_to_look(result: MainJobResult, s: Settings, bootstrap: str) -> list[str]:
    """Lines saying where the reports are and which commands show the rest."""
    conn = f"--bootstrap {bootstrap}" + (f" --prefix {s.prefix}" if s.prefix else "") + f" --home {s.home}"
    lines = ["where to look:"]
    for name, run in (("behaviour run", result.behaviour), ("trained run", result.trained)):
        if run is not None and run.report is not None:
            lines.append(f"  report ({name}): {run.report}")
    last = result.trained.run_id if result.trained else result.run_id
    lines += [f"  live dashboard:  marlgrc dashboard {conn}   (then open http://127.0.0.1:8787)",
              f"  audit yourself:  marlgrc verify --run {last} {conn}",
              f"  retrain:         marlgrc train --run {result.run_id} --algo {ALGO} "
              f"--updates {result.training.updates} {conn}"]
    return lines


def summary_lines(result: MainJobResult) -> list[str]:
    """Return before and after training, and what exactly is compared."""
    b, t = result.behaviour, result.trained
    lines = [f"summary: mean team return per episode on {ENV_ID} (all agents' raw rewards summed; higher is better)",
             f"  before training  {b.mean_return:8.2f}   random behaviour policy, run {b.run_id}, "
             f"{b.episodes} episodes (seeds {b.seeds[0]}..{b.seeds[1]})"]
    if t is not None:
        tr = result.training
        lines += [f"  after training   {t.mean_return:8.2f}   {t.policy_version} (greedy DQN: {tr.updates} updates, "
                  f"{tr.optimizer_steps} optimizer steps on the behaviour run's topics, rewarded with the decision "
                  f"interpreter's credit), run {t.run_id}, {t.episodes} episodes on inboxes it never trained on "
                  f"(seeds {t.seeds[0]}..{t.seeds[1]})",
                  f"  on those same inboxes, without events: random policy {result.random_reference:.2f}, "
                  f"the env's heuristic rule {result.heuristic_reference:.2f}",
                  f"  change: {t.mean_return - b.mean_return:+.2f} per episode"
                  + ("" if t.mean_return > b.mean_return else " (no improvement)")]
    return lines
