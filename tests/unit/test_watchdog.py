"""compose.watchdog: a released guard leaves its home alone; a guarded process that dies unreleased,
SIGKILL included, has its home deleted by the watcher. (With real services:
tests/integration/test_interrupt_cleanup.py.)"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from compose.watchdog import guard

ROOT = Path(__file__).resolve().parents[2]

GUARDED = """
import os, signal, sys, time
from pathlib import Path
from compose.watchdog import guard

g = guard(Path(sys.argv[1]), remove=sys.argv[3] == "remove")
print(g.proc.pid, flush=True)
if sys.argv[2] == "release":
    g.release()
elif sys.argv[2] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
# "exit": ends without releasing (an os._exit, a crash in C code, ...)
os._exit(0)
"""


def _home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    (home / "kafka").mkdir(parents=True)
    (home / "kafka" / "server.properties").write_text("node.id=1\n")
    return home


def _run_guarded(home: Path, how: str, remove: str = "remove") -> tuple[int, int]:
    proc = subprocess.run([sys.executable, "-c", GUARDED, str(home), how, remove], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    return proc.returncode, int(proc.stdout.split()[0])


def _wait_exit(pid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:   # the watcher may be our grandchild's orphan, reaped by init; a zombie counts as gone
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (OSError, IndexError):
            return True
        time.sleep(0.02)
    return False


def test_a_released_guard_leaves_the_home_alone(tmp_path):
    home = _home(tmp_path)
    rc, watcher = _run_guarded(home, "release")
    assert rc == 0
    assert _wait_exit(watcher)
    assert (home / "kafka" / "server.properties").read_text() == "node.id=1\n"


def test_a_killed_process_has_its_home_stopped_and_deleted(tmp_path):
    home = _home(tmp_path)
    rc, watcher = _run_guarded(home, "kill")
    assert rc == -signal.SIGKILL
    assert _wait_exit(watcher), "the watcher did not end after its guarded process was killed"
    assert not home.exists()


def test_an_unreleased_exit_counts_as_a_death(tmp_path):
    home = _home(tmp_path)
    rc, watcher = _run_guarded(home, "exit")
    assert rc == 0
    assert _wait_exit(watcher)
    assert not home.exists()


def test_without_remove_the_home_stays(tmp_path):
    """A guard without ``remove`` stops the services (here none ran) but keeps their data and the home."""
    home = _home(tmp_path)
    rc, watcher = _run_guarded(home, "kill", "keep")
    assert rc == -signal.SIGKILL
    assert _wait_exit(watcher)
    assert (home / "kafka" / "server.properties").read_text() == "node.id=1\n"


def test_releasing_a_guard_whose_watcher_died_says_nothing(tmp_path):
    g = guard(_home(tmp_path))
    g.proc.kill()
    g.proc.wait(10)
    g.release()
    g.release()   # idempotent
