"""deploy/ and systemd/ against the code and the real tools (promtool, systemd-analyze).

Every metric name in the Grafana dashboard and the alert rules must be one batchd
exports; the rules, their unit tests, the example Prometheus config and the unit
file must pass the tools that will load them in production.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, Summary
from prometheus_client import generate_latest as _generate_latest

from batchd.metrics import Metrics
from tests.conftest import skip_without

ROOT = Path(__file__).resolve().parent.parent
PROM = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "batchd.json"
UNIT = ROOT / "systemd" / "batchd.service"

ALERTS = {
    "BatchdDown",
    "BatchdNoSuccessfulPoll",
    "BatchdBacklogGrowing",
    "BatchdJobFailures",
    "BatchdBatchExpired",
    "BatchdApiAccessDenied",
    "BatchdApiErrorRate",
    "BatchdTokenLimitRefusals",
    "BatchdOldJob",
    "BatchdSourceDown",
    "BatchdBudgetWaiting",
}
MAX_EXPOSURE = 2.0


def _tool(name: str) -> str:
    return skip_without(name)


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


def generate_latest(registry: CollectorRegistry) -> str:
    """The registry in the text format /metrics serves."""
    return _generate_latest(registry).decode()


# --- metric names in PromQL -----------------------------------------------------------

_TOKEN = re.compile(
    r"""
      (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<range>\[[^\]]*\])                      # [5m], [$__rate_interval], [1h:5m]
    | (?P<number>(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
                 (?:(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*)?)  # 1.5, 1e3, 5m, 1h30m
    | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
    | (?P<var>\$\{?\w+\}?)                       # a Grafana variable outside a string
    | (?P<space>\s+)
    | (?P<punct>.)
    """,
    re.VERBOSE,
)
# Identifiers that are not series names: set and binary operators, modifiers, literals.
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}
# Followed by a parenthesised list of label names, not an expression.
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects (not functions, keywords or labels)."""
    tokens = [
        (m.lastgroup, m.group())
        for m in _TOKEN.finditer(expr)
        if m.lastgroup not in ("space", "string", "range", "number", "var")
    ]
    names: set[str] = set()
    i = 0
    while i < len(tokens):
        kind, tok = tokens[i]
        nxt = tokens[i + 1][1].lower() if i + 1 < len(tokens) else ""
        if tok == "{":  # label matchers: skip to the closing brace
            i = tokens.index(("punct", "}"), i)
        elif tok.lower() in _GROUPING and nxt == "(":  # a list of label names
            i = tokens.index(("punct", ")"), i)
        elif kind == "ident" and tok.lower() not in _KEYWORDS:
            # Before "(" stands a function, before "by"/"without" an aggregation.
            if nxt not in ("(", "by", "without"):
                names.add(tok)
        i += 1
    return names


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        (
            'sum by (le, operation) (rate(a_bucket{instance=~"$instance", code="5.."}[5m]))',
            {"a_bucket"},
        ),
        ("histogram_quantile(0.9, sum(rate(a_bucket[$__rate_interval])) by (le))", {"a_bucket"}),
        ("time() - b > 600 and c unless d or e > bool 1e3 * inf", {"b", "c", "d", "e"}),
        ("x / on(instance) group_left(version) y offset 1h30m", {"x", "y"}),
        ('max_over_time(up[5m:1m]) + count_values("v", z) * 26 * 3600', {"up", "z"}),
        ("sum without (job) (k:rate5m)", {"k:rate5m"}),
    ],
)
def test_metric_names(expr: str, expected: set[str]) -> None:
    assert metric_names(expr) == expected


# --- what batchd exports --------------------------------------------------------------


def _samples(text: str) -> set[str]:
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in lines}


def _exposed(text: str) -> set[str]:
    """Sample names in exposition text, including those of families without samples yet.

    A labelled metric with no children exposes only its # TYPE line, so each family's
    sample names are derived from its type as prometheus_client writes them.
    """
    names = _samples(text)
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names |= {
                "counter": {name, name.removesuffix("_total") + "_created"},
                "histogram": {f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_created"},
                "summary": {f"{name}_sum", f"{name}_count", f"{name}_created"},
            }.get(kind, {name})
    return names


def test_exposed_names_follow_prometheus_client() -> None:
    """_exposed() of families without children predicts exactly the samples they later show."""
    r = CollectorRegistry()
    metrics = [
        k(f"m_{k.__name__.lower()}", "h", ["l"], registry=r)
        for k in (Counter, Gauge, Histogram, Summary)
    ]
    Info("m_build", "h", registry=r).info({"v": "1"})
    predicted = _exposed(generate_latest(r))
    for m in metrics:
        m.labels("x")
    assert predicted == _samples(generate_latest(r))
    assert {
        "m_counter_total",
        "m_counter_created",
        "m_histogram_bucket",
        "m_build_info",
    } <= predicted


@pytest.fixture(scope="module")
def exported() -> set[str]:
    """Every series name batchd's /metrics can show, plus the scrape's own `up`."""
    return _exposed(generate_latest(Metrics().registry)) | {"up"}


# --- the Grafana dashboard ------------------------------------------------------------


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))  # a collapsed row keeps its panels inside


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def _dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) for every query in the dashboard, panels and template variables."""
    out = []
    for p in _panels(dashboard["panels"]):
        for t in p.get("targets", []):
            out.append((f"panel {p['title']!r} {t.get('refId')}", t.get("expr", "")))
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            # label_values(METRIC_SELECTOR, label) is Grafana's, not PromQL
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", q.strip())
            assert m, f"variable {v['name']}: unexpected query {q!r}"
            out.append((f"variable {v['name']}", m.group(1)))
    return out


def test_dashboard_uses_only_exported_metrics(
    dashboard: dict[str, Any], exported: set[str]
) -> None:
    unknown = {
        (where, name)
        for where, expr in _dashboard_exprs(dashboard)
        for name in metric_names(expr)
        if name not in exported
    }
    assert not unknown, f"metrics not exported by batchd.metrics.Metrics: {sorted(unknown)}"


def test_dashboard_has_no_dead_panels(dashboard: dict[str, Any]) -> None:
    panels = list(_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 20
    for p in graphs:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            assert t.get("expr", "").strip(), f"panel {p['title']!r} {t['refId']}: empty query"
            assert metric_names(t["expr"]), f"panel {p['title']!r}: selects no metric"
            assert t.get("datasource", p["datasource"]) == p["datasource"], p["title"]


def test_dashboard_datasource_variable(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = variables["datasource"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
    assert "__inputs" not in dashboard, "use ${datasource}, not import-time inputs"


def test_dashboard_provider_variable(dashboard: dict[str, Any]) -> None:
    """Every panel on a metric with a `provider` label follows the provider variable."""
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    prov = variables["provider"]
    assert prov["type"] == "query" and prov["includeAll"] and prov["multi"]
    labelled = {"jobs_finished", "batches_created", "batches_ended", "api_requests", "tokens"}
    labelled |= {"cost_usd", "cost_unpriced_requests"}
    for where, expr in _dashboard_exprs(dashboard):
        if where == "variable provider":
            continue
        for name in metric_names(expr):
            if name.removeprefix("batchd_").removesuffix("_total") in labelled:
                assert 'provider=~"$provider"' in expr, where
    m = Metrics(["openai", "claude"])
    text = generate_latest(m.registry)
    assert 'batchd_batches_created_total{provider="claude"} 0.0' in text


def test_dashboard_queries_parse(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """promtool parses every dashboard query (Grafana variables substituted)."""
    promtool = _tool("promtool")
    durations = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}

    def substitute(expr: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: durations.get(m.group(1), "x"), expr)

    rules = [
        {"record": f"dashboard:query_{i}", "expr": substitute(expr), "labels": {"at": where}}
        for i, (where, expr) in enumerate(_dashboard_exprs(dashboard))
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = _run(promtool, "check", "rules", str(path))
    assert res.returncode == 0, res.stdout + res.stderr


# --- Prometheus rules and config ------------------------------------------------------


@pytest.fixture(scope="module")
def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load((PROM / "alerts.yml").read_text(encoding="utf-8"))
    return [r for g in data["groups"] for r in g["rules"]]


def test_alerts_use_only_exported_metrics(
    alert_rules: list[dict[str, Any]], exported: set[str]
) -> None:
    unknown = {
        (r["alert"], name)
        for r in alert_rules
        for name in metric_names(str(r["expr"]))
        if name not in exported
    }
    assert not unknown, f"metrics not exported by batchd.metrics.Metrics: {sorted(unknown)}"


def test_alerts_are_complete(alert_rules: list[dict[str, Any]]) -> None:
    assert {r["alert"] for r in alert_rules} == ALERTS
    for r in alert_rules:
        assert r["labels"]["severity"] in ("critical", "warning"), r["alert"]
        assert {"summary", "description"} <= set(r["annotations"]), r["alert"]


def test_every_alert_is_tested_firing_and_silent() -> None:
    data = yaml.safe_load((PROM / "alerts_test.yml").read_text(encoding="utf-8"))
    cases = [c for t in data["tests"] for c in t.get("alert_rule_test", [])]
    fires = {c["alertname"] for c in cases if c.get("exp_alerts")}
    silent = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert fires == ALERTS
    assert silent == ALERTS


def test_promtool_check_rules() -> None:
    res = _run(_tool("promtool"), "check", "rules", str(PROM / "alerts.yml"))
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_test_rules() -> None:
    res = _run(_tool("promtool"), "test", "rules", str(PROM / "alerts_test.yml"))
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_check_config() -> None:
    res = _run(_tool("promtool"), "check", "config", str(PROM / "prometheus.yml"))
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_check_metrics() -> None:
    """batchd's exposition passes promtool's lint (names, units, HELP, TYPE)."""
    text = generate_latest(Metrics().registry)
    res = _run(_tool("promtool"), "check", "metrics", stdin=text)
    assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), res.stdout + res.stderr


# --- systemd --------------------------------------------------------------------------


def _unit_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_has_the_service_contract() -> None:
    s = _unit_settings(UNIT)
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert s["ExecStart"] == ["/usr/local/bin/batchd run --config /etc/batchd/config.toml"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["WatchdogSec"] == ["30s"]
    assert s["Restart"] == ["on-failure"]
    assert s["TimeoutStopSec"] == ["30s"]
    assert s["LoadCredential"] == ["openai_api_key:/etc/batchd/openai_api_key"]
    assert s["StateDirectory"] == ["batchd"]
    assert "/var/spool/batchd" in s["ReadWritePaths"]
    # outbound HTTPS to the API must stay possible
    assert s.get("PrivateNetwork", ["no"]) == ["no"]
    assert "any" not in " ".join(s.get("IPAddressDeny", []))


def _unit_in(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at a stand-in, since verify wants an executable."""
    fake = tmp_path / "bin" / "batchd"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text(encoding="utf-8").replace("/usr/local/bin/batchd", str(fake)))
    return unit


def _complaints(stderr: str) -> list[str]:
    # verify exits 0 on unknown keys and unparsable values; it only says so on stderr.
    return [line for line in stderr.splitlines() if UNIT.name in line]


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = _unit_in(tmp_path)
    res = _run(_tool("systemd-analyze"), "verify", "--man=no", str(unit))
    assert res.returncode == 0 and not _complaints(res.stderr), res.stdout + res.stderr


def test_systemd_analyze_security(tmp_path: Path) -> None:
    unit = _unit_in(tmp_path)
    res = _run(_tool("systemd-analyze"), "security", "--offline=yes", "--no-pager", str(unit))
    assert res.returncode == 0 and not _complaints(res.stderr), res.stdout + res.stderr
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", res.stdout)
    assert m, res.stdout
    assert float(m.group(1)) <= MAX_EXPOSURE, res.stdout


def test_sysusers_and_tmpfiles_create_the_spool(tmp_path: Path) -> None:
    """The sysusers user and the tmpfiles spool tree, created in a scratch root."""
    sysusers, tmpfiles = _tool("systemd-sysusers"), _tool("systemd-tmpfiles")
    if os.geteuid() != 0:
        pytest.skip("systemd-tmpfiles --create chowns to batchd: needs root")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    conf = ROOT / "systemd"
    res = _run(sysusers, f"--root={root}", str(conf / "batchd.sysusers.conf"))
    assert res.returncode == 0, res.stderr
    res = _run(tmpfiles, "--create", f"--root={root}", str(conf / "batchd.tmpfiles.conf"))
    assert res.returncode == 0, res.stderr
    uid = next(
        int(line.split(":")[2])
        for line in (root / "etc" / "passwd").read_text().splitlines()
        if line.startswith("batchd:")
    )
    spool = root / "var" / "spool" / "batchd"
    modes = {p.name: (p.stat().st_mode & 0o7777, p.stat().st_uid) for p in spool.iterdir()}
    assert modes == {
        "inbox": (0o2770, uid),
        "processing": (0o750, uid),
        "done": (0o2750, uid),
        "failed": (0o2750, uid),
    }


def test_in_ci_a_test_skipped_for_a_missing_tool_fails(tmp_path: Path) -> None:
    """Before: `.ci/run` only warned when promtool/systemd could not be installed, and
    their tests then skipped in silence."""
    (tmp_path / "conftest.py").write_text("from tests.conftest import *  # noqa: F403\n")
    (tmp_path / "test_tool.py").write_text(
        "from tests.conftest import skip_without\n\n"
        "def test_needs_it() -> None:\n"
        "    skip_without('no-such-tool-batchd')\n"
    )
    root = Path(__file__).resolve().parent.parent
    args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_tool.py")]
    base = {**os.environ, "PYTHONPATH": str(root)}
    base.pop("CI", None)
    plain = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=base)
    assert plain.returncode == 0 and "1 skipped" in plain.stdout, plain.stdout
    ci = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env={**base, "CI": "true"}
    )
    assert ci.returncode == 1 and "1 failed" in ci.stdout, ci.stdout
    assert ".ci/run must install it" in ci.stdout


def test_dashboard_shows_replicas(dashboard: dict[str, Any]) -> None:
    """Replicas sharing a PostgreSQL store: leases and roles per replica (instance)."""
    exprs = [expr for _where, expr in _dashboard_exprs(dashboard)]
    for metric in ("batchd_replica_leases", "batchd_replica_role"):
        shown = [e for e in exprs if metric in metric_names(e)]
        assert shown and all("instance" in e for e in shown), metric
