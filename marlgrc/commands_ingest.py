"""`marlgrc ingest --telemetry FILE|-`: recorded sandbox telemetry (seed 002's JSON Lines) into a
``sandbox_v0`` run. Validation is ``producers.telemetry.parse_telemetry_lines`` (pydantic); this
module only wires it: every bad line is printed with its line number and reason and written to
``marl.dlq`` on the run's ``{run}:dlq`` chain, then the good lines are replayed through the harness
(``producers.telemetry.replay_env``) as a signed run that verifies, syncs and trains like any other."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .config import BootOpt, HomeOpt, PrefixOpt, Settings
from .errors import fail

CONSUMER = "marlgrc-ingest"
SHOWN_BAD_LINES = 20


def _read_lines(telemetry: str) -> tuple[list[bytes], str]:
    """The lines of FILE (or stdin for ``-``) and the source's name for events: the file's name only,
    never its directory (a home directory names a person)."""
    if telemetry == "-":
        return sys.stdin.buffer.read().splitlines(), "stdin"
    path = Path(telemetry)
    try:
        return path.read_bytes().splitlines(), path.name
    except OSError as exc:
        fail(f"cannot read telemetry file {telemetry} ({exc.strerror or exc}); give a JSON Lines file in seed 002's "
             f"format, or - to read standard input")


def register(app: typer.Typer) -> None:
    @app.command("ingest")
    def ingest(telemetry: str = typer.Option(..., "--telemetry", help="recorded telemetry: JSON Lines in seed 002's "
                                             "format, a file or - for standard input"),
               sandboxes: int = typer.Option(2, "--sandboxes", min=1, help="sandbox_v0 agents: recordings replayed "
                                             "side by side in each episode"),
               policy: str = typer.Option("random", "--policy", help="random | heuristic | onnx:PATH: who acts on the "
                                          "replayed telemetry"),
               policy_key: Optional[Path] = typer.Option(None, "--public-key", help="with --policy onnx:PATH: the "
                                                         "trusted key its signature must verify with"),
               seed: int = typer.Option(0, "--seed"),
               home: Optional[Path] = HomeOpt, bootstrap: Optional[str] = BootOpt,
               prefix: Optional[str] = PrefixOpt) -> None:
        """Validate recorded sandbox telemetry line by line and replay the valid lines as a sandbox_v0 run
        (one recorded episode per sandbox per episode). Bad lines are reported with their line number and
        reason and go to marl.dlq with it. Prints the run id; exit 1 when no line was valid."""
        from eventlog.checkpoint import KeyFileError, Signer
        from eventlog.kafka import BrokerUnavailable, DeliveryError, EventProducer, ensure_topics
        from eventlog.log import EventLog
        from producers.harness import HarnessError, run_episodes
        from producers.policies import ONNX_PREFIX, builtin_policy
        from producers.telemetry import dead_letter_payload, parse_telemetry_lines, replay_env, replay_episodes

        from .commands_producers import _onnx_policy
        from .training import new_run_id

        s = Settings.load(home=home, bootstrap=bootstrap, prefix=prefix)
        lines, source = _read_lines(telemetry)
        parsed = parse_telemetry_lines(lines)
        recordings = parsed.recordings()
        env = replay_env(recordings, sandboxes) if recordings else None
        if env is not None:
            try:
                acting = (_onnx_policy(s, policy[len(ONNX_PREFIX):], policy_key, env) if policy.startswith(ONNX_PREFIX)
                          else builtin_policy(policy, env, seed))
            except ValueError as exc:
                fail(str(exc))
        for bad in parsed.bad[:SHOWN_BAD_LINES]:
            typer.echo(bad.reason, err=True)
        if len(parsed.bad) > SHOWN_BAD_LINES:
            typer.echo(f"... and {len(parsed.bad) - SHOWN_BAD_LINES} more bad lines (all in marl.dlq)", err=True)
        boot = s.resolve_bootstrap()
        try:
            signer = Signer.load_or_create(s.signing_key)
        except KeyFileError as exc:
            fail(str(exc))
        run_id = new_run_id("sandbox_v0", "telemetry", seed)
        try:
            ensure_topics(boot, s.prefix)
            log = EventLog(EventProducer(boot, prefix=s.prefix, client_id=CONSUMER), run_id=run_id,
                           producer_id="telemetry-ingest", signer=signer)
            # dead letters first, so run.finished's chain heads name the dead-letter chain too
            for bad in parsed.bad:
                log.append(f"{run_id}:dlq", "dead.letter", dead_letter_payload(bad, source, CONSUMER))
            summary = None
            if env is not None:
                episodes = replay_episodes(recordings, sandboxes)
                summary = run_episodes(env, acting, log, episodes=episodes, seed=seed, env_id="sandbox_v0",
                                       env_version="0", config={
                                           "telemetry_source": source, "telemetry_lines": parsed.lines,
                                           "valid_lines": len(parsed.records), "dead_letters": len(parsed.bad),
                                           "recordings": len(recordings), "replay": "recording-per-sandbox/1"})
            log.close()
        except (BrokerUnavailable, DeliveryError, HarnessError) as exc:
            fail(str(exc))
        typer.echo(f"telemetry {source}: {parsed.lines} lines: {len(parsed.records)} valid in {len(recordings)} "
                   f"recorded episodes, {len(parsed.bad)} bad (marl.dlq chain {run_id}:dlq, with their reasons)"
                   + (f", {parsed.blank} blank" if parsed.blank else ""), err=True)
        if summary is None:
            fail(f"no valid telemetry line in {source}: nothing to replay; fix the lines above (each reason "
                 f"names the field) and ingest again", 1)
        typer.echo(f"run {run_id}: sandbox_v0 replay, {sandboxes} sandboxes, {summary.episodes} episodes, "
                   f"{summary.steps} steps, {summary.events} events, mean team return {summary.mean_return:.2f} "
                   f"({acting.version}); check it with `marlgrc verify --run {run_id}`", err=True)
        typer.echo(run_id)
