"""A guard that stops a home's services when the process that started them dies, SIGKILL included.

Services run detached (:mod:`compose.services`), so they outlive the Python process that started
them. A process that stops them on the way out (a test session's teardown, its ``atexit`` hook, the
KeyboardInterrupt that SIGTERM raises there) covers every end but SIGKILL: a CI job killed on a
timeout, ``kill -9``, the OOM killer. For those, :func:`guard` starts a small watcher process in a
session of its own that holds the read end of a pipe whose write end only the guarded process
holds. When that process dies, however it dies, the kernel closes its end and the watcher reads
end-of-file: it stops the home's Kafka and PostgreSQL and, with ``remove``, deletes the home.

A process that finishes cleanly calls :meth:`Guard.release` after its own stop: the watcher reads the
release byte and exits without touching the home (which may be gone already). No polling of pids
(a pid can be reused), no native calls (``prctl``): one pipe and the kernel's own bookkeeping::

    g = guard(home, remove=True)    # right after the home is made, before any service starts
    ...                             # start_kafka(home), start_postgres(home), the work
    stop_kafka(home); stop_postgres(home); g.release()

A child made by ``fork`` without ``exec`` inherits the write end, and the watcher then waits for it
too; ``subprocess`` and the ``spawn`` start method do not pass it on.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

_RELEASE = b"r"


@dataclass
class Guard:
    """The guarded process's side: the pipe's write end and the watcher."""

    proc: subprocess.Popen[bytes]
    _fd: int | None

    def release(self) -> None:
        """The guarded process has stopped its services itself: the watcher exits, touching nothing.
        Idempotent."""
        if self._fd is None:
            return
        try:
            os.write(self._fd, _RELEASE)
        except OSError:   # the watcher is gone already (killed by hand): nothing to release
            pass
        finally:
            os.close(self._fd)
            self._fd = None
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def guard(home: Path, *, remove: bool = False) -> Guard:
    """Start the watcher of ``home``: if this process dies before :meth:`Guard.release`, the home's
    Kafka (single broker or cluster) and PostgreSQL are stopped, and with ``remove`` their data and
    the home itself deleted (a throw-away home, e.g. a test session's)."""
    read_end, write_end = os.pipe()   # both non-inheritable: no other child of this process gets them
    package_root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    argv = [sys.executable, "-m", "compose.watchdog", str(home)] + (["--remove"] if remove else [])
    try:
        proc = subprocess.Popen(argv, stdin=read_end, stdout=subprocess.DEVNULL, env=env, cwd="/",
                                start_new_session=True, close_fds=True)
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    return Guard(proc, write_end)


def _stop(home: Path, remove: bool) -> None:
    from compose.kafka import kill_kafka, stop_kafka
    from compose.postgres import stop_postgres

    if not home.is_dir():
        return
    try:
        if remove:   # its data goes next: no controlled shutdown to wait for
            kill_kafka(home)
        stop_kafka(home, remove_data=remove)
    finally:
        try:
            stop_postgres(home, remove_data=remove)
        finally:
            if remove:
                shutil.rmtree(home, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m compose.watchdog",
                                description="Stop HOME's services when the pipe on stdin closes unreleased.")
    p.add_argument("home", type=Path)
    p.add_argument("--remove", action="store_true", help="also delete the services' data and HOME")
    args = p.parse_args(argv)
    got = os.read(sys.stdin.fileno(), 1)   # blocks until the release byte, or end-of-file
    if got == _RELEASE:
        return 0
    _stop(args.home, args.remove)
    try:   # after the stop: the guarded process's stderr may be a pipe nobody reads any more
        print(f"compose.watchdog: the process that guarded {args.home} ended without releasing it: "
              f"its services stopped{' and the home deleted' if args.remove else ''}", file=sys.stderr)
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
