"""`marlgrc dashboard` as a person uses it: a real broker, the dashboard process, Debian's Chromium
driven by Playwright, a training run in progress (`marlgrc train-online`, every transition through
Kafka), then a processor worker scoring it. The page is opened before the run starts; the test waits
for live points to arrive and grow without a reload (returns and updates while the run trains,
credit and fairness while the worker catches up), then checks that the charts and the audit panel
show the run's actual figures, read independently from Kafka and from the one verifier (what
`marlgrc verify --run R` reports). The screenshot is kept in test-artifacts/dashboard.png.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka import Producer

from eventlog.audit import verify_kafka
from eventlog.checkpoint import Signer
from eventlog.codec import default_codec
from eventlog.kafka import ensure_topics, read_records
from tests.conftest import IN_CI

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
ITERATIONS, EPISODES_PER_UPDATE, CYCLES = 12, 2, 25
POISON = b"\x00not an avro event\xff"
CODEC = default_codec()


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's package; `./dev test` installs it when missing). Never downloaded:
    Playwright drives the system binary. Under CI a missing browser fails the test."""
    exe = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(exe).exists():
        msg = "Chromium is not installed (apt-get install chromium; `./dev test` does it when it can)"
        if IN_CI:
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _wait(what: str, cond, timeout: float, logs: list[Path] = ()) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in logs if p.exists())
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")
        time.sleep(0.2)


def _points(page, chart: str) -> int:
    return int(page.get_attribute(f'svg[data-chart="{chart}"]', "data-points") or 0)


def test_live_dashboard_shows_the_runs_actual_figures(kafka, prefix, tmp_path, browser):
    boot = kafka.bootstrap
    ensure_topics(boot, prefix)
    home = tmp_path / "home"
    key = Signer.load_or_create(home / "keys" / "signing.pem").public_key
    logs = {n: tmp_path / f"{n}.log" for n in ("worker", "dashboard", "train")}
    common = ["--bootstrap", boot, "--prefix", prefix, "--home", str(home)]
    procs = []
    try:
        dash = _start(["-m", "marlgrc", "dashboard", "--port", "0", *common], logs["dashboard"])
        procs.append(dash)

        def listening() -> str | None:
            assert dash.poll() is None, f"the dashboard exited:\n{logs['dashboard'].read_text()[-3000:]}"
            m = re.search(r"dashboard on (http://127\.0\.0\.1:\d+)", logs["dashboard"].read_text())
            return m and m.group(1)
        _wait("the dashboard to listen", listening, 30, [logs["dashboard"]])

        page = browser.new_page(viewport={"width": 1500, "height": 1400})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(listening())
        page.wait_for_selector('#conn[data-state="live"]', timeout=15_000)
        assert page.inner_text("#run-id") == "no run yet"
        page.evaluate("window.__opened = 'once'")

        # a training run in progress: every transition through Kafka, a policy.update per iteration
        train = _start(["-m", "marlgrc", "train-online", "--env", "simple_spread_v3", "--algo", "mappo",
                        "--iterations", str(ITERATIONS), "--set", f"episodes_per_update={EPISODES_PER_UPDATE}",
                        "--env-arg", f"max_cycles={CYCLES}", "--eval-episodes", "0", *common], logs["train"])
        procs.append(train)

        # live: points arrive while the run is in progress, and keep arriving without a reload
        page.wait_for_function('() => +document.querySelector(\'svg[data-chart="returns"]\').dataset.points >= 2',
                               timeout=60_000)
        first = _points(page, "returns")
        assert train.poll() is None, "the run ended before the page saw it in progress; the test proves nothing"
        assert page.inner_text("#run-status").startswith(("running", "completed"))
        page.wait_for_function(f'() => +document.querySelector(\'svg[data-chart="returns"]\').dataset.points > {first}'
                               f' && +document.querySelector(\'svg[data-chart="updates"]\').dataset.points > 0',
                               timeout=60_000)
        _wait("the training run to finish", lambda: train.poll() is not None, 120, [logs["train"]])
        assert train.returncode == 0, logs["train"].read_text()[-3000:]
        (run,) = {CODEC.decode(r.value)[1]["run_id"] for r in read_records(boot, ["marl.run.lifecycle"], prefix=prefix)}
        assert logs["train"].read_text().strip().splitlines()[-1] == run

        # then the decision interpreter: a worker credits the run's backlog while the page watches; a poison
        # record on its input topic becomes a dead letter. (The worker starts after the training: the
        # on-policy reader refuses a credit chain whose earlier part fell between two of its batches.)
        assert _points(page, "credits") == 0
        raw = Producer({"bootstrap.servers": boot})
        raw.produce(prefix + "marl.joint.action", POISON, b"poison")
        raw.flush(10)
        procs.append(_start(["-m", "stream_processors", "--bootstrap", boot, "--prefix", prefix, "--batch", "100",
                             "--signing-key", str(home / "keys" / "signing.pem")], logs["worker"]))
        page.wait_for_function('() => +document.querySelector(\'svg[data-chart="credits"]\').dataset.points > 0 && '
                               '+document.querySelector(\'svg[data-chart="gini"]\').dataset.points > 0', timeout=60_000)

        # everything the run wrote, credited by the worker (one credit per joint action)
        def of_run(topic):
            return [r for r in read_records(boot, [topic], prefix=prefix) if r.key.startswith(f"{run}:")]
        steps = len(of_run("marl.joint.action"))
        assert steps == ITERATIONS * EPISODES_PER_UPDATE * CYCLES
        _wait("the worker to credit every joint action", lambda: len(of_run("marl.di.credit")) >= steps, 60,
              [logs["worker"]])
        _wait("the dead letter", lambda: len(list(read_records(boot, ["marl.dlq"], prefix=prefix))) >= 1, 30,
              [logs["worker"]])
        time.sleep(1.0)   # the worker signs its chains as each transaction commits

        # the page catches up: every chain verified through its last event
        page.wait_for_function(f'''() => {{
            const rows = [...document.querySelectorAll("#chains tr.chain-row")];
            return +document.querySelector("#run-steps").dataset.value === {steps}
              && rows.some((r) => r.dataset.topic === "marl.di.credit" && +r.dataset.lastSeq === {steps - 1})
              && rows.length > 0 && rows.every((r) => r.dataset.verifiedLastSeq !== ""
                   && +r.dataset.verifiedLastSeq === +r.dataset.lastSeq);
        }}''', timeout=60_000)
        assert page.evaluate("window.__opened") == "once", "the page was reloaded"

        # the run's actual figures, read independently
        summaries = [CODEC.decode(r.value)[1] for r in of_run("marl.run.lifecycle")]
        summaries = [s for s in summaries if s["event_type"] == "episode.summary"]
        assert page.inner_text("#run-id") == run
        assert len(summaries) == ITERATIONS * EPISODES_PER_UPDATE
        assert int(page.get_attribute("#run-episodes", "data-value")) == len(summaries)
        assert _points(page, "returns") == len(summaries)
        assert float(page.get_attribute("#run-last-return", "data-value")) == pytest.approx(
            summaries[-1]["episode_return"], rel=1e-12)
        assert _points(page, "updates") == len(of_run("marl.policy.update")) == ITERATIONS
        fairness = [CODEC.decode(r.value)[1] for r in of_run("marl.fairness.metrics") if r.key == f"{run}:fairness"]
        episode_windows = [f for f in fairness if f["window"] == "episode"]
        page.wait_for_function(f'() => +document.querySelector(\'svg[data-chart="gini"]\').dataset.points === '
                               f'{len(episode_windows)}', timeout=10_000)
        assert int(page.get_attribute('svg[data-chart="credits"]', "data-series")) == 3

        report, _ = verify_kafka(boot, prefix=prefix, run_id=run, public_key=key)
        assert report.ok, [b.describe() for b in report.breaks]
        assert page.get_attribute("#run-verdict", "data-value") == "verified"
        rows = {(r.get_attribute("data-topic"), r.get_attribute("data-chain")): r
                for r in page.query_selector_all("#chains tr.chain-row")}
        assert set(rows) == {(c.topic, c.chain_id) for c in report.chains}
        for c in report.chains:
            row = rows[(c.topic, c.chain_id)]
            assert int(row.get_attribute("data-last-seq")) == c.last_seq, c.chain_id
            assert int(row.get_attribute("data-signed-through")) == c.signed_through_seq, c.chain_id
            assert int(row.get_attribute("data-events")) == c.events, c.chain_id
            assert row.get_attribute("data-status") == "ok"

        (dead,) = [CODEC.decode(r.value)[1] for r in read_records(boot, ["marl.dlq"], prefix=prefix)]
        page.wait_for_selector("#dlq tr.dlq-row", timeout=10_000)
        (row,) = page.query_selector_all("#dlq tr.dlq-row")
        assert row.get_attribute("data-reason") == dead["reason"] and dead["reason"]
        assert row.get_attribute("data-kind") == dead["error_kind"]
        assert int(row.get_attribute("data-source-offset")) == dead["source_offset"]
        assert not errors, errors

        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"dashboard screenshot: {shot}")
    finally:
        for p in reversed(procs):
            _stop(p)
