"""The Grafana dashboard and the Prometheus scrape config in compose/ (issue 18 item 2) against the
code: every metric a dashboard query names is one the parts export (their registries, collected by
importing the modules that define them), every label it groups by is one those metrics carry, and
the scrape config targets the ports the commands are documented to serve on."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose"
DASHBOARD = COMPOSE / "grafana" / "marlgrc.json"

# PromQL's own words (functions, aggregations, operators, modifiers) and the series Prometheus makes
# itself; any other identifier in a query must be a metric the code exports
PROMQL = {
    "sum", "avg", "min", "max", "count", "topk", "bottomk", "quantile", "stddev", "stdvar", "count_values", "group",
    "rate", "irate", "increase", "delta", "idelta", "deriv", "resets", "changes", "histogram_quantile", "vector",
    "scalar", "abs", "clamp_min", "clamp_max", "round", "label_replace", "time", "timestamp", "absent",
    "avg_over_time", "max_over_time", "min_over_time", "sum_over_time", "last_over_time",
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or", "unless",
}
PROMETHEUS_OWN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("", "_sum", "_count", "_created")}


def exported() -> dict[str, set[str]]:
    """{series name as scraped: its label names} of every metric the parts define: marlgrc's (harness,
    learner, ledger sync), the processor worker's and the faust fairness app's."""
    from prometheus_client.metrics import MetricWrapperBase

    from marlgrc.metrics import HarnessMetrics, LearnerMetrics, LedgerSyncMetrics
    from stream_processors import faust_fairness
    from stream_processors.worker import Metrics

    holders = [HarnessMetrics(CollectorRegistry()), LearnerMetrics(CollectorRegistry()),
               LedgerSyncMetrics(CollectorRegistry()), Metrics(None), faust_fairness.metrics]
    series: dict[str, set[str]] = {}
    for holder in holders:
        for metric in vars(holder).values():
            if not isinstance(metric, MetricWrapperBase):
                continue
            for family in metric.describe():  # the family name: a counter's without its _total
                for suffix in SUFFIXES[family.type]:
                    series[family.name + suffix] = set(metric._labelnames) | ({"le"} if suffix == "_bucket" else set())
    return series


def queries() -> list[tuple[str, str]]:
    """(panel title, PromQL expression) of every query of every panel."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            out.append((panel["title"], t["expr"]))
    return out


def identifiers(expr: str) -> tuple[set[str], set[str]]:
    """(metric and function names, label names in matchers and by/without/on/ignoring clauses) of a
    PromQL expression; string literals, ranges and numbers left out."""
    body = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)           # string literals
    body = re.sub(r"\[[^\]]*\]", "", body)                     # range selectors, e.g. [1m], [$__range]
    labels = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", " ".join(re.findall(r"\{([^}]*)\}", body))))
    body = re.sub(r"\{[^}]*\}", "", body)                      # label matchers
    for clause in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", body):
        labels |= {x.strip() for x in clause.split(",") if x.strip()}
    body = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", r"\1", body)
    names = set(re.findall(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)", body))
    return names, labels


def test_every_query_names_only_exported_metrics_and_their_labels():
    series = exported()
    problems = []
    used = set()
    for title, expr in queries():
        names, labels = identifiers(expr)
        metrics = names - PROMQL
        assert metrics, f"{title}: no metric in {expr!r}"
        for m in sorted(metrics - PROMETHEUS_OWN):
            if m not in series:
                problems.append(f"{title}: {m} is not exported by any part (query {expr!r})")
                continue
            used.add(m)
        own = set().union(*(series.get(m, set()) for m in metrics))
        for label in labels - own - {"job", "instance"}:
            problems.append(f"{title}: label {label!r} is not a label of {sorted(metrics)}")
    assert not problems, "\n".join(problems)
    # what the issue asks the operators to see, from every long-running part
    for wanted in ("marlgrc_harness_events_total", "marlgrc_harness_steps_total", "marlgrc_harness_last_return",
                   "marlgrc_learner_updates_total", "marlgrc_learner_last_return",
                   "marlgrc_processor_events_in_total", "marlgrc_processor_consumer_lag",
                   "marlgrc_processor_dead_letters_total", "marlgrc_ledger_events_ingested_total",
                   "marlgrc_ledger_consumer_lag", "marlgrc_ledger_integrity_findings_total"):
        assert wanted in used, f"the dashboard does not show {wanted}"


def test_the_parser_catches_a_wrong_name_and_a_wrong_label():
    names, labels = identifiers('sum by (topic) (rate(marlgrc_harness_event_total{topic="x",kind!~"y"}[1m])) or vector(0)')
    assert names - PROMQL == {"marlgrc_harness_event_total"} and "marlgrc_harness_event_total" not in exported()
    assert labels == {"topic", "kind"}
    names, _ = identifiers('histogram_quantile(0.99, sum by (le) (rate(marlgrc_processor_latency_seconds_bucket[5m])))')
    assert names - PROMQL == {"marlgrc_processor_latency_seconds_bucket"}


def test_dashboard_is_well_formed():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "marlgrc"
    assert [v["type"] for v in dash["templating"]["list"]] == ["datasource"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
            assert p.get("description"), f"{p['title']}: say what the panel shows"
            assert p["fieldConfig"]["defaults"].get("unit"), f"{p['title']}: a unit"
            assert {t["refId"] for t in p["targets"]} == {chr(65 + i) for i in range(len(p["targets"]))}


def scrape_targets() -> dict[str, list[str]]:
    """{job_name: targets} of compose/prometheus.yml (the subset of YAML it is written in)."""
    jobs: dict[str, list[str]] = {}
    job = None
    for line in (COMPOSE / "prometheus.yml").read_text().splitlines():
        line = line.split("#", 1)[0].rstrip()
        m = re.match(r"\s*-\s*job_name:\s*(\S+)$", line)
        if m:
            job = m.group(1)
            jobs[job] = []
        m = re.match(r"\s*-?\s*targets:\s*\[(.*)\]$", line)
        if m:
            assert job is not None, line
            jobs[job] += [t.strip().strip("'\"") for t in m.group(1).split(",") if t.strip()]
    return jobs


def test_scrape_config_targets_the_documented_ports():
    from marlgrc.metrics import PORTS

    assert scrape_targets() == {f"marlgrc-{job}": [f"127.0.0.1:{port}"] for job, port in PORTS.items()}
    docs = (ROOT / "docs" / "OPERATIONS.md").read_text()
    monitoring = docs[docs.index("## Monitoring"):]
    for job, port in PORTS.items():
        assert str(port) in monitoring, f"docs/OPERATIONS.md's Monitoring section does not name port {port} ({job})"
    # the `up{job=~"marlgrc-.*"}` panel and the jobs agree
    assert all(j.startswith("marlgrc-") for j in scrape_targets())


@pytest.mark.parametrize("command,job", [(["run"], "harness"), (["train-online"], "learner"),
                                         (["ledger", "sync"], "ledger"), (["process"], "processor")])
def test_each_command_serves_on_its_documented_port(command, job):
    from typer.testing import CliRunner

    from marlgrc.cli import app
    from marlgrc.metrics import PORTS

    res = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    assert "--metrics-port" in res.output and str(PORTS[job]) in res.output, res.output


def test_compose_profile_starts_prometheus_and_grafana_with_these_files():
    text = (COMPOSE / "docker-compose.yml").read_text()
    for service in ("prometheus", "grafana"):
        block = text[text.index(f"\n  {service}:"):]
        block = block[: block.index("\n\n")] if "\n\n" in block else block
        assert 'profiles: ["monitoring"]' in block, service
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml" in text
    assert "./grafana/marlgrc.json:" in text and "./grafana/provisioning:/etc/grafana/provisioning" in text
    provider = (COMPOSE / "grafana" / "provisioning" / "dashboards" / "marlgrc.yml").read_text()
    mounted = re.search(r"\./grafana/marlgrc\.json:(\S+?)(?::ro)?$", text, re.M).group(1)
    assert re.search(r"path:\s*(\S+)", provider).group(1) == str(Path(mounted).parent)
    pyproject = (ROOT / "pyproject.toml").read_text()
    shipped = re.search(r"^compose = \[(.*)\]$", pyproject, re.M).group(1)
    assert '"grafana/*.json"' in shipped and '"grafana/provisioning/*/*.yml"' in shipped
