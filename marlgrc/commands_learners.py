"""`marlgrc train`: train a learner from a run's topics (or an auditor's bundle), with lineage,
signed checkpoints and ONNX export; `marlgrc train-online`: on-policy through the event log, with a
learning curve (the one loop: ``learners.online``, wired in ``marlgrc.training``)."""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Optional

import typer

from .config import BootOpt, HomeOpt, PrefixOpt, Settings, parse_env_args
from .errors import fail
from .metrics import TappedSink, metrics_port_option
from .progress import ProgressOpt, progress_bar


ALGO_HELP = ("mappo | ippo | dqn | qmix | maddpg | sac (learners.algorithms(); sac: continuous actions only; "
             "qmix, dqn: discrete only)")


def register(app: typer.Typer) -> None:
    @app.command()
    def train(run: Optional[str] = typer.Option(None, "--run", help="run id to train from"),
              algo: str = typer.Option("mappo", "--algo", help=ALGO_HELP),
              allow_unverified: bool = typer.Option(False, "--allow-unverified",
                                                    help="train even if a chain fails verification (lineage says so)"),
              seed: int = typer.Option(1, "--seed"),
              updates: int = typer.Option(1, "--updates", help="updates over the replayed episodes"),
              resume: Optional[Path] = typer.Option(None, "--resume", help="signed checkpoint to resume from"),
              onnx: Optional[Path] = typer.Option(None, "--onnx", help="also export the greedy policy to this ONNX "
                                                  "file, signed with the home's key (OUT.sig.json beside it)"),
              out: Optional[Path] = typer.Option(None, "--out", help="checkpoint path (default HOME/checkpoints/RUN__ALGO__SEED)"),
              bundle: Optional[Path] = typer.Option(None, "--bundle", help="read an exported bundle instead of Kafka"),
              public_key: Optional[Path] = typer.Option(None, "--public-key", help="trusted Ed25519 public key (PEM)"),
              progress: bool = ProgressOpt,
              home: Optional[Path] = HomeOpt, bootstrap: Optional[str] = BootOpt,
              prefix: Optional[str] = PrefixOpt) -> None:
        """Train ALGO from the events of run RUN: verified replay, policy.update lineage, signed checkpoint."""
        from eventlog.checkpoint import KeyFileError, Signer, load_public_key
        from eventlog.kafka import BrokerUnavailable, EventProducer
        from eventlog.log import EventLog, MemorySink
        from learners import algorithm
        from learners.checkpoint import CheckpointError, learner_from_checkpoint, load_signing_key, save_checkpoint
        from learners.export import export_onnx
        from learners.offline import train_offline
        from learners.replay import ReplayError, read_bundle_run, read_kafka

        try:
            algorithm(algo)
        except KeyError as exc:
            fail(str(exc.args[0]))
        s = Settings.load(home=home, bootstrap=bootstrap, prefix=prefix)
        try:
            signer = Signer.load_or_create(s.signing_key)
            key = load_signing_key(s.signing_key)
            pk = load_public_key(public_key) if public_key else None
        except KeyFileError as exc:
            fail(str(exc))
        if bundle is None and run is None:
            fail("name the run to train from with --run (or give --bundle)")
        try:
            with progress_bar(f"reading and verifying {f'run {run}' if run else 'the run'} from "
                              f"{bundle if bundle is not None else 'Kafka'}", enabled=progress):
                if bundle is not None:
                    replay = read_bundle_run(bundle, run, public_key=pk, allow_unverified=allow_unverified)
                    boot = s.bootstrap
                else:
                    boot = s.resolve_bootstrap()
                    replay = read_kafka(boot, run, prefix=s.prefix, public_key=pk or signer.public_key,
                                        allow_unverified=allow_unverified)
        except (ReplayError, BrokerUnavailable, KeyError) as exc:
            fail(str(exc))
        if not replay.episodes:
            fail(f"run {replay.spec.run_id}: no complete episode in its topics; nothing to train on")
        if not replay.verified:
            typer.echo("warning: training on a stream that failed verification; lineage says verified=false", err=True)
        learner = None
        if resume is not None:
            try:
                learner = learner_from_checkpoint(resume, signer.public_key if pk is None else pk)
            except CheckpointError as exc:
                fail(str(exc))
        sink = EventProducer(boot, prefix=s.prefix) if boot else MemorySink()
        try:
            with progress_bar(f"training {algo} on {len(replay.episodes)} episodes of {replay.spec.run_id}", updates,
                              unit="updates", enabled=progress) as bar:
                # each update ends with its policy.update event: counted on its way to the sink
                counting = TappedSink(sink, lambda topic, _: bar.advance() if topic == "marl.policy.update" else None)
                # a checkpoint chain of this session's own; the policy chain continues (train_offline)
                log = EventLog(counting, run_id=replay.spec.run_id,
                               producer_id=f"learner-{algo}-{uuid.uuid4().hex[:8]}", signer=signer)
                learner, events = train_offline(replay, algo, log=log, seed=seed, updates=updates, learner=learner)
        except ReplayError as exc:
            fail(str(exc))
        log.close()
        base = out or s.checkpoints / f"{replay.spec.run_id}__{algo}__{seed}" / "policy"
        save_checkpoint(base, learner, key)
        if isinstance(sink, MemorySink):
            from eventlog.bundle import write_bundle
            from eventlog.checkpoint import public_key_pem
            from learners.replay import records_from_memory

            write_bundle(Path(str(base) + ".updates"), records_from_memory(sink.sent),
                         public_key_pem=public_key_pem(signer.public_key))
        if onnx is not None:
            # signed like the checkpoint, with the home's key; the signature names the policy.update
            # event of this version (its lineage), and OnnxPolicy checks it before ONNX Runtime runs it
            export_onnx(learner, onnx, signer, policy_update=events[-1] if events else None)
        typer.echo(f"run {replay.spec.run_id}: {len(replay.episodes)} episodes, {replay.env_steps} steps "
                   f"(verified={replay.verified}); {algo} {learner.version}, {learner.optimizer_steps} optimizer steps; "
                   f"{len(events)} policy.update event(s); checkpoint {base}.pt"
                   + (f"; onnx {onnx} (signature {onnx}.sig.json)" if onnx else ""))

    @app.command()
    def reproduce(run: str = typer.Option(..., "--run", help="the run whose updates to retrain: a train-online, "
                                          "run --algo or --producers N (learner) run"),
                  bundle: Optional[Path] = typer.Option(None, "--bundle", help="read an exported bundle instead of Kafka"),
                  public_key: Optional[Path] = typer.Option(None, "--public-key", help="trusted Ed25519 public key (PEM)"),
                  allow_unverified: bool = typer.Option(False, "--allow-unverified",
                                                        help="retrain even if a chain fails verification"),
                  checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="also save the retrained "
                                                            "learner as a checkpoint signed with the home's key"),
                  as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
                  progress: bool = ProgressOpt,
                  home: Optional[Path] = HomeOpt, bootstrap: Optional[str] = BootOpt,
                  prefix: Optional[str] = PrefixOpt) -> None:
        """Train RUN's learner again from its topics alone and compare every update's weights with the hash its
        policy.update recorded (rolled-back updates: the restored weights too). Exit 0 when all are equal, 1 when
        any differs, 2 when it could not read or replay the run."""
        import json

        from eventlog.bundle import read_bundle
        from eventlog.kafka import read_records
        from learners.replay import VERIFY_TOPICS
        from learners.reproduce import reproduce as reproduce_run

        from .cli import _public_key

        s = Settings.load(home=home, bootstrap=bootstrap, prefix=prefix)
        key = _public_key(public_key, s, bundle)
        source = f"bundle {bundle}" if bundle is not None else "Kafka"
        with progress_bar(f"reading, verifying and retraining run {run} from {source}", enabled=progress):
            records = (read_bundle(bundle) if bundle is not None else
                       read_records(s.resolve_bootstrap(), VERIFY_TOPICS, prefix=s.prefix))
            out = reproduce_run(records, run, public_key=key, allow_unverified=allow_unverified)
        if checkpoint is not None:
            from learners.checkpoint import load_signing_key, save_checkpoint

            save_checkpoint(checkpoint, out.learner, load_signing_key(s.signing_key))
        if as_json:
            typer.echo(json.dumps({
                "run_id": out.run_id, "kind": out.kind, "algorithm": out.algo, "ok": out.ok, "events": out.events,
                "signatures_checked": out.signatures_checked,
                "updates": [{"seq": c.seq, "policy_version": c.policy_version, "recorded": c.recorded.hex(),
                             "retrained": c.retrained.hex(), "rolled_back": c.rolled_back, "restored": c.restored,
                             "equal": c.equal} for c in out.checks]}, indent=1))
        else:
            typer.echo(f"run {out.run_id} ({out.kind}, {out.algo}): {len(out.checks)} update(s) retrained from "
                       f"{out.events} verified events ({'signatures checked' if out.signatures_checked else 'no public key: signatures not checked'})")
            for c in out.checks:
                verdict = "equal" if c.recorded == c.retrained else \
                    f"DIFFERS: recorded {c.recorded.hex()[:16]}…, retrained {c.retrained.hex()[:16]}…"
                if c.rolled_back:
                    verdict += "; rolled back, restored weights " + ("equal" if c.restored else "DIFFER")
                typer.echo(f"  update seq {c.seq} {c.policy_version}: {verdict}")
            first = out.first_difference
            typer.echo("reproduced: every update's weights equal the hash its policy.update recorded" if out.ok else
                       f"NOT reproduced: {sum(not c.equal for c in out.checks)} of {len(out.checks)} update(s) differ, "
                       f"the first at seq {first.seq} ({first.policy_version})")
            if checkpoint is not None:
                typer.echo(f"checkpoint {checkpoint}.pt (the retrained learner)")
        if not out.ok:
            raise typer.Exit(1)

    @app.command("train-online")
    def train_online_cmd(
        env: str = typer.Option("simple_spread_v3", "--env", help="simple_spread_v3 | mailbox_v0 | sandbox_v0 | "
                                "market_v0 | retail_v0 | banking_v0 | module:factory"),
        env_arg: list[str] = typer.Option([], "--env-arg", help="env factory argument name=value (repeatable), "
                                          "e.g. fair_reward=false"),
        algo: str = typer.Option("mappo", "--algo", help=ALGO_HELP),
        minutes: Optional[float] = typer.Option(None, "--minutes", min=0, help="train for this long (wall clock)"),
        iterations: Optional[int] = typer.Option(None, "--iterations", min=1,
                                                 help="act/read-back/update rounds (default: 10, or as many as "
                                                      "--minutes allows)"),
        out: Optional[Path] = typer.Option(None, "--out", help="learning curve (JSON), rewritten after every update, "
                                           "with the evaluation at the end"),
        seed: int = typer.Option(1, "--seed"),
        continuous: bool = typer.Option(False, "--continuous", help="continuous actions (MPE2 envs)"),
        overrides: list[str] = typer.Option([], "--set", metavar="FIELD=VALUE",
                                            help="override a config field, e.g. --set update_epochs=10 (repeatable)"),
        eval_episodes: int = typer.Option(100, "--eval-episodes", min=0,
                                          help="episodes to evaluate random, heuristic and learned policies on "
                                               "(0: none)"),
        threads: int = typer.Option(1, "--threads", min=1, help="torch CPU threads"),
        producers: int = typer.Option(1, "--producers", min=1,
                                      help="producer processes feeding one learner through a Kafka consumer group, "
                                           "each writing run RUN.pK (seed 002); 1: one process"),
        lag: int = typer.Option(0, "--lag", min=0, help="with --producers N: round r is collected with the policy "
                                "of update r - LAG, so with 1 the producers collect the next round while the "
                                "learner updates (PPO scores each round with the policy that acted); 0: "
                                "synchronous rounds"),
        checkpoint: Optional[Path] = typer.Option(None, "--checkpoint",
                                                  help="signed checkpoint path (default HOME/checkpoints/RUN/policy)"),
        home: Optional[Path] = HomeOpt,
        bootstrap: Optional[str] = typer.Option(None, "--bootstrap", help="Kafka bootstrap (default "
                                                "$MARLGRC_BOOTSTRAP or the broker `up` started), or `memory`: the "
                                                "sealed events stay in this process (no broker)"),
        prefix: Optional[str] = PrefixOpt,
        progress: bool = ProgressOpt,
        metrics_port: Optional[int] = metrics_port_option("learner"),
        curriculum: bool = typer.Option(False, "--curriculum", help="play the env's stages from the easiest, "
                                        "promoted and regressed by its CURRICULUM criteria over a window of episodes "
                                        "(seed 004; curriculum.stage events on RUN:curriculum; the evaluation is "
                                        "at the hardest stage reached)"),
        curriculum_window: int = typer.Option(20, "--curriculum-window", min=3, help="with --curriculum: episodes "
                                              "at a stage, and in the window, before it is judged"),
    ) -> None:
        """On-policy training through the event log: act with the current policy, write every step as
        signed events, read them back verified, update; writes a learning curve. Prints the run id."""
        from .training import run_training

        s = Settings.load(home=home, bootstrap=bootstrap, prefix=prefix)
        try:
            env_args = parse_env_args(env_arg)
        except ValueError as exc:
            fail(str(exc))
        staged = None
        if curriculum:
            from learners.curriculum import CurriculumConfig

            if producers > 1:
                fail("--curriculum runs in one process: drop --producers (or --curriculum)")
            staged = CurriculumConfig(curriculum_window, curriculum_window)
        if lag and producers < 2:
            fail("--lag overlaps producer processes with the learner: give --producers N (N >= 2)")
        if producers > 1:  # producer processes and a learner through Kafka (marlgrc.scaleout)
            from .scaleout import run_scaleout

            res = run_scaleout(s, env=env, algo=algo, producers=producers, seed=seed, iterations=iterations,
                               minutes=minutes, continuous=continuous, env_args=env_args, overrides=overrides,
                               out=out, checkpoint=checkpoint, threads=threads, lag=lag,
                               eval_episodes=eval_episodes, say=typer.echo)
            typer.echo(res.run_id)
            return
        res = run_training(s, env=env, algo=algo, seed=seed, iterations=iterations, minutes=minutes,
                           continuous=continuous, env_args=env_args, overrides=overrides, out=out,
                           checkpoint=checkpoint, eval_episodes=eval_episodes, threads=threads, say=typer.echo,
                           progress=progress, metrics_port=metrics_port, curriculum=staged)
        typer.echo(res.run_id)
