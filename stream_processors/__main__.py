"""``python -m stream_processors --bootstrap HOST:PORT [--prefix P] [--name N] [--metrics-port PORT]
[--signing-key PEM] [--group [--session-timeout S]]``:
the live worker, for supervisors and tests (``marlgrc process`` is the same with the CLI's settings)."""
from __future__ import annotations

import argparse
import logging

from .worker import WorkerConfig, serve


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m stream_processors")
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--prefix", default="")
    ap.add_argument("--name", default="di")
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--default-env", default="passthrough")
    ap.add_argument("--metrics-port", type=int, default=None)
    ap.add_argument("--signing-key", default=None, help="Ed25519 PEM key: sign every chain the worker writes, checkpoint chains included")
    ap.add_argument("--group", action="store_true",
                    help="join the consumer group of --name and share the partition numbers (scale out)")
    ap.add_argument("--session-timeout", type=float, default=10.0,
                    help="with --group: seconds a silent member keeps its partitions (6-300)")
    a = ap.parse_args()
    if a.group and not 6 <= a.session_timeout <= 300:
        ap.error(f"--session-timeout {a.session_timeout:g} is outside the broker's default range of 6 to 300 s")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve(WorkerConfig(a.bootstrap, a.prefix, a.name, a.batch, default_env=a.default_env,
                       metrics_port=a.metrics_port, signing_key=a.signing_key, group=a.group,
                       session_timeout_ms=int(a.session_timeout * 1000)))


if __name__ == "__main__":
    main()
