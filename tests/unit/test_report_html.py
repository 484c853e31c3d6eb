"""The HTML run report (ledger/report_html.py): one self-contained page per run, each panel one
metric with its unit and range, every PNG decodable, the run's own figures and its verdict."""
from __future__ import annotations

import base64
import html
import io
import re

import pytest
import torch

from eventlog.checkpoint import Signer
from eventlog.codec import default_codec
from eventlog.log import EventLog, MemorySink
from learners.offline import train_offline
from learners.replay import read_records_of_run, records_from_memory
from ledger import Materializer, SqliteLedger, StaticKey
from ledger.report_html import FAIRNESS_METRICS, write_html_report
from producers.envs import sandbox_v0
from producers.harness import run_episodes
from producers.policies import RandomPolicy
from stream_processors.processor import INPUT_TOPICS, Processor
from tests.synthetic import synthetic_run

SIGNER = Signer.from_seed(b"report-html")
KEY = StaticKey(bytes(range(2, 34)))
PNG = b"\x89PNG\r\n\x1a\n"
CODEC = default_codec()


def _processed(sent):
    """The run's events, then what the decision interpreter derives from them (credit, fairness)."""
    p = Processor(max_pending=None, max_states=None, signer=SIGNER)
    records = records_from_memory(sent)
    derived = [ev for r in records if r.topic in INPUT_TOPICS for ev in p.feed(r.topic, r.partition, r.offset,
                                                                                r.key, r.value)] + p.finish()
    derived += p.checkpoint()  # the worker signs at each commit
    return records + records_from_memory([(e.topic, e.chain_id, e.value) for e in derived])


@pytest.fixture(scope="module")
def ledger(tmp_path_factory):
    """sandbox_v0, 6 random episodes, scored by the processor, trained on (DQN, 2 updates)."""
    torch.set_num_threads(1)
    sink = MemorySink()
    log = EventLog(sink, run_id="rh1", producer_id="harness", signer=SIGNER)
    env = sandbox_v0.parallel_env()
    summary = run_episodes(env, RandomPolicy(env, seed=3), log, episodes=6, seed=3, env_id="sandbox_v0",
                           env_version="0", config={})
    log.close()
    replay = read_records_of_run(records_from_memory(sink.sent), "rh1", public_key=SIGNER.public_key)
    tlog = EventLog(sink, run_id="rh1", producer_id="learner-dqn", signer=SIGNER)
    train_offline(replay, "dqn", log=tlog, seed=1, updates=2)
    tlog.close()
    old = MemorySink()  # a run whose joint actions carry no decision tier
    synthetic_run(EventLog(old, run_id="syn", producer_id="syn"), episodes=2, steps=5)
    store = SqliteLedger(tmp_path_factory.mktemp("ledger") / "l.db", KEY)
    Materializer(store).ingest(_processed(sink.sent) + records_from_memory(old.sent))
    # every live agent's decision of every step, all taken by the random policy
    decisions = sum(len(CODEC.decode(v)[1]["actions"]) for t, _, v in sink.sent if t == "marl.joint.action")
    yield store, summary, decisions
    store.close()


def _pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def _section(page: str, key: str) -> str:
    m = re.search(rf'<section id="panel-{re.escape(key)}">(.*?)</section>', page, re.S)
    assert m, f"panel {key} missing"
    return m.group(1)


def test_every_panel_with_the_runs_figures(ledger, tmp_path):
    import matplotlib.image as mpimg

    store, summary, decisions = ledger
    rep = write_html_report(store, "rh1", tmp_path, public_key=SIGNER.public_key)
    assert rep.path == tmp_path / "report.html"
    page = rep.path.read_text()
    # self-contained: no file or network reference, every image inline and decodable
    assert "http://" not in page and "https://" not in page and "<script" not in page
    pngs = _pngs(page)
    assert len(pngs) == sum(p.png is not None for p in rep.panels) >= 6
    for data in pngs:
        assert data.startswith(PNG)
        img = mpimg.imread(io.BytesIO(data), format="png")
        assert img.shape[0] > 100 and img.shape[1] > 200
    # convergence: the run's own episode count and returns
    conv = _section(page, "convergence")
    assert f"{summary.episodes} episodes" in conv
    assert f"last {summary.episode_returns[-1]:.4g}" in conv
    assert "<img" in conv and "unit: team return" in conv
    versions = _section(page, "returns-per-version")
    assert f"random-v1: {summary.episodes} episodes, mean team return {summary.mean_return:.4g}" in versions
    # training: the two policy.update events that name the run, and the lineage of the last one
    assert "<img" in _section(page, "training-losses-td")
    lineage = _section(page, "lineage")
    assert "trained on this run: 2 policy.update events" in lineage
    assert "rh1:actions" in lineage
    # credit per agent over time: one line per agent
    credit = _section(page, "credit")
    assert "sandbox_0:" in credit and "sandbox_1:" in credit and "<img" in credit
    # fairness: one panel per index, fixed 0..1 axis; the window counts are figures, not panels
    for name in ("gini", "jain"):
        sec = _section(page, f"fairness-{name}")
        assert "range: 0 to 1 (fixed axis)" in sec and "<img" in sec
    assert 'id="panel-fairness-steps"' not in page and 'id="panel-fairness-agents"' not in page
    assert "steps per episode window" in _section(page, "fairness-gini")
    assert html.escape(FAIRNESS_METRICS["jain"][0]) in page
    # decisions per tier, from the decision_tier the harness recorded
    tiers = _section(page, "tiers")
    assert "<img" in tiers and f"{decisions} decisions: random {decisions} (100.0%)" in tiers
    # verification: the verdict and one table row per chain of the run
    ver = _section(page, "verification")
    assert rep.verification.verdict == "VERIFIED" and ">VERIFIED<" in ver
    assert ver.count("<tr>") - 1 == len(rep.verification.rows) >= 6
    assert "rh1:actions" in ver and "rh1:policy:dqn" in ver and "rh1:credit" in ver


def test_a_run_without_tiers_says_not_recorded_and_no_key_says_so(ledger, tmp_path):
    store, _, _ = ledger
    rep = write_html_report(store, "syn", tmp_path / "syn.html")
    page = rep.path.read_text()
    assert "not recorded" in _section(page, "tiers") and "<img" not in _section(page, "tiers")
    assert "no di.credit events" in _section(page, "credit")
    assert "signatures were not checked" in _section(page, "verification")


def test_an_unknown_run_is_a_clear_error(ledger, tmp_path):
    store, _, _ = ledger
    with pytest.raises(LookupError, match="no rows for run 'nope'.*ledger sync"):
        write_html_report(store, "nope", tmp_path)
