"""Progress bars of the long commands (issue 18 item 4): on a terminal a bar says what the command does
and how far it is; piped output (``marlgrc ... | cat``) and ``--no-progress`` carry no control codes
and still end with the command's result line; the parts' progress callbacks count up to the total.

The commands run as a user runs them, in their own process: stdout and stderr on pipes, or stderr
on a pseudo-terminal (``pty``), which rich takes for an interactive terminal. The tests that need a
broker are marked ``integration``."""
from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ESC = "\x1b"
COUNT = re.compile(r"([\d,]+)/([\d,]+) (events|updates|offsets|records)")
# a plain pipe: nothing in the environment that tells rich or click to colour or animate anyway; and
# no broker or prefix from the environment (a command with a bundle and no broker keeps its output in
# files): the tests that use the broker pass it
DROPPED = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "CLICOLOR_FORCE", "PY_COLORS", "MARLGRC_BOOTSTRAP",
           "MARLGRC_TOPIC_PREFIX")


def _env(**more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DROPPED}
    env.update(PYTHONPATH=str(ROOT), COLUMNS="160", **more)
    return env


def marlgrc(*args, tty: bool = False, timeout: float = 180, **env: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``python -m marlgrc ARGS``: stdout on a pipe; stderr on a pipe,
    or with ``tty`` on a pseudo-terminal of 160 columns (its bytes as they were drawn)."""
    argv = [sys.executable, "-m", "marlgrc", *map(str, args)]
    if not tty:
        res = subprocess.run(argv, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=timeout)
        return res.returncode, res.stdout, res.stderr
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen(argv, cwd=ROOT, env=_env(TERM="xterm-256color", **env), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    drawn, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                drawn.append(data)
            elif proc.poll() is not None:
                break
        out = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return proc.returncode, out.decode(), b"".join(drawn).decode("utf-8", "replace")


def counts(drawn: str, unit: str) -> list[tuple[int, int]]:
    """Every ``done/total unit`` a bar drew, in order."""
    return [(int(a.replace(",", "")), int(b.replace(",", ""))) for a, b, u in COUNT.findall(drawn) if u == unit]


def assert_clean(out: str, err: str) -> None:
    assert ESC not in out and ESC not in err, f"control codes in piped output:\nstdout {out!r}\nstderr {err!r}"
    assert "━" not in err, f"a progress bar in piped output: {err!r}"


# ---------------------------------------------------------------- a bundle, no broker
@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> tuple[Path, Path, int, int]:
    """(home, bundle folder, data events in it, all its events): 4 sandbox_v0 episodes sealed in
    memory and signed with the home's key, written as an auditor's bundle."""
    from eventlog.bundle import write_bundle
    from eventlog.checkpoint import Signer, public_key_pem
    from eventlog.log import EventLog, MemorySink
    from learners.replay import records_from_memory
    from producers.envs import make_env
    from producers.harness import run_episodes
    from producers.policies import builtin_policy

    home = tmp_path_factory.mktemp("home")
    signer = Signer.load_or_create(home / "keys" / "signing.pem")
    env, env_id, version = make_env("sandbox_v0")
    sink = MemorySink()
    log = EventLog(sink, run_id="progress-run", producer_id="harness-test", signer=signer)
    run_episodes(env, builtin_policy("random", env, 0), log, episodes=4, seed=0, env_id=env_id, env_version=version,
                 config={})
    log.close()
    folder = home / "bundle"
    write_bundle(folder, records_from_memory(sink.sent), public_key_pem=public_key_pem(signer.public_key),
                 signer=signer)
    data = sum(1 for topic, _, _ in sink.sent if topic != "marl.audit.checkpoints")
    return home, folder, data, len(sink.sent)


def test_verify_bundle_progress_counts_up_to_its_events(bundle):
    from eventlog.audit import verify_bundle

    _, folder, data, _ = bundle
    calls: list[int] = []
    report, _ = verify_bundle(folder, progress=calls.append)
    assert report.ok
    assert calls and all(n > 0 for n in calls), calls
    assert sum(calls) == data


@pytest.mark.parametrize("flag", [[], ["--no-progress"]], ids=["default", "no-progress"])
def test_piped_output_is_clean_and_ends_with_the_result(bundle, flag):
    home, folder, _, every = bundle
    code, out, err = marlgrc("verify", "--bundle", folder, "--home", home, *flag)
    assert code == 0, err
    assert_clean(out, err)
    assert f"{every} events in" in out and "no break" in out


def test_a_terminal_shows_what_is_done_and_how_far(bundle):
    home, folder, data, every = bundle
    code, out, drawn = marlgrc("verify", "--bundle", folder, "--home", home, tty=True)
    assert code == 0, drawn
    assert "verifying bundle" in drawn and ESC in drawn
    seen = counts(drawn, "events")  # frames come 10 times a second: a quick one may show only the last
    assert seen and all(total == data for _, total in seen[:-1]), seen  # the manifest's data events
    assert seen[-1][0] == seen[-1][1] > 0, seen  # and the bar ends full
    assert f"{every} events in" in out and ESC not in out  # stdout is still a pipe: the result, plain
    code, out, drawn = marlgrc("train", "--bundle", folder, "--updates", "2", "--home", home, tty=True)
    assert code == 0, drawn
    assert "reading and verifying" in drawn and "training mappo" in drawn
    seen = counts(drawn, "updates")
    assert seen[-1] == (2, 2) and [a for a, _ in seen] == sorted(a for a, _ in seen), seen
    assert "2 policy.update event(s)" in out


def test_no_progress_draws_nothing_even_on_a_terminal(bundle):
    home, folder, _, every = bundle
    code, out, drawn = marlgrc("verify", "--bundle", folder, "--home", home, "--no-progress", tty=True)
    assert code == 0, drawn
    # a note may be coloured on a terminal; no bar, no cursor hidden, no line redrawn
    assert "━" not in drawn and "\x1b[?25l" not in drawn and "\x1b[2K" not in drawn and "\r" not in drawn.replace(
        "\r\n", ""), drawn
    assert "note:" in drawn and f"{every} events in" in out


def test_a_bar_counts_when_nothing_is_drawn():
    from marlgrc.progress import counted, progress_bar

    with progress_bar("counting", 2500, unit="items") as bar:  # stderr is no terminal under pytest
        assert not bar.shown
        assert list(counted(range(2500), bar, every=1000)) == list(range(2500))
        assert bar.completed == 2500
    with progress_bar("a stage") as bar:
        pass
    assert bar.total == 0 and bar.completed == 0  # ends full, not pulsing


# ---------------------------------------------------------------- with a broker
@pytest.fixture
def kafka_run(kafka, topics, tmp_path) -> tuple[str, str, Path, str]:
    """(bootstrap, prefix, home, run id) of a 3-episode mailbox_v0 run written through the CLI."""
    code, out, err = marlgrc("run", "--env", "mailbox_v0", "--episodes", "3", "--home", tmp_path,
                             "--bootstrap", kafka.bootstrap, "--prefix", topics)
    assert code == 0, err
    assert_clean(out, err)
    return kafka.bootstrap, topics, tmp_path, out.strip().splitlines()[-1]


@pytest.mark.integration
def test_sync_reports_its_position_up_to_the_topics_end(kafka_run):
    import schemas
    from ledger import SqliteLedger, StaticKey, sync
    from marlgrc.progress import Backlog

    boot, prefix, home, _ = kafka_run
    store = SqliteLedger(home / "l.db", StaticKey(bytes(range(32))))
    positions: list[int] = []
    batches: list[int] = []
    stats = sync(store, boot, prefix=prefix, commit_every=50, on_position=lambda p: positions.append(sum(p.values())),
                 on_batch=lambda s: batches.append(s.records))
    backlog = Backlog(boot, schemas.TOPICS, prefix)
    end = sum(backlog.ends().values())
    backlog.close()
    assert positions[0] == 0 and positions[-1] == end, positions  # from nothing to the end offsets
    assert positions == sorted(positions) and len(set(positions)) > 3, positions  # it moved, batch by batch
    assert batches == sorted(batches) and batches[-1] == stats.records > 100


@pytest.mark.integration
def test_long_commands_through_the_broker_piped_and_on_a_terminal(kafka_run):
    boot, prefix, home, run = kafka_run
    common = ["--home", home, "--bootstrap", boot]
    code, out, drawn = marlgrc("export", "--out", home / "b", "--run", run, *common, "--prefix", prefix, tty=True)
    assert code == 0, drawn
    exported = int(re.search(r": (\d+) events", out).group(1))
    seen = counts(drawn, "events")
    assert "reading run" in drawn and seen[-1] == (exported, exported), seen
    assert [a for a, _ in seen] == sorted(a for a, _ in seen), seen

    for args, result in [
        (["ledger", "sync", *common, "--prefix", prefix], "ingested "),
        (["import", home / "b", *common, "--prefix", prefix + "copy."], f"imported {exported} events"),
        (["reprocess", "--run", run, *common, "--prefix", prefix], '"di.credit": 60'),
        (["verify", "--run", run, *common, "--prefix", prefix], "no break"),
    ]:
        code, out, err = marlgrc(*args)
        assert code == 0, err
        assert_clean(out, err)
        assert result in out, out

    code, out, drawn = marlgrc("ledger", "sync", "--ledger", home / "second.db", *common, "--prefix", prefix, tty=True)
    assert code == 0, drawn
    seen = counts(drawn, "offsets")
    assert "reading the marl.* topics into the ledger" in drawn and seen and seen[-1][0] == seen[-1][1] > 0, seen
