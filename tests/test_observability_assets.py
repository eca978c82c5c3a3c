"""The observability assets under deploy/, checked with promtool and against a live Sluice.

- ``deploy/prometheus/alerts.yml``: ``promtool check rules``, and ``promtool test rules``
  on ``alerts_test.yml`` (every alert fires on its series, stays quiet on look-alikes);
- ``deploy/prometheus/prometheus.yml``: ``promtool check config`` (which loads the rules);
- a live scrape: Sluice in-process on real sockets (limits on ``memory://``, short links,
  three webhook subscriptions to a real receiver answering 204, 400 and 410, a dead
  upstream, a one-event buffer that overflows, a failed and a good reload);
  ``promtool check metrics`` passes on it, and every metric and label that the dashboard
  and the rules query is in it, the webhook gauges without any API call in between;
- ``deploy/grafana/sluice-dashboard.json``: well-formed, unique panel ids, a datasource
  and targets on every panel, only defined variables, and PromQL that promtool parses.

promtool comes with the Debian package ``prometheus`` (``make test`` installs it as root
through ``scripts/ensure-binaries.sh promtool``); without it these tests fail, they do not
skip.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from tests.inproc import Sluice, running, write_rules
from tests.servers import free_port
from tests.upstream import make_upstream

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "deploy" / "grafana"
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = GRAFANA / "sluice-dashboard.json"
ALERTS = PROMETHEUS / "alerts.yml"

DS = "${DS_PROMETHEUS}"
TARGET_LABELS = {"job", "instance"}  # added by Prometheus at scrape time
SEVERITIES = {"critical", "warning"}
REQUIRED_ALERTS = {
    "SluiceStorageDegraded",
    "SluiceRejectionRatioSpike",
    "SluiceWebhookDeadLettersGrowing",
    "SluiceWebhookBacklogStale",
    "SluiceConfigReloadFailing",
    "SluiceUpstream5xxRatioHigh",
    "SluiceEventsDropped",
}
# Families the live scenario cannot give a sample: memory:// never fails, nor does the
# SQLite outbox. Their names are still checked (declared in the scrape); their labels not.
NO_SAMPLES_EXPECTED = {"sluice_storage_errors_total", "sluice_events_outbox_errors_total"}

TOKEN = "observability-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DELIVERIES = "sluice_webhook_deliveries_total"
OUTCOMES = {"ops": "delivered", "refused": "dead", "retired": "gone"}  # webhook: its result
SECRET = "whsec_" + base64.b64encode(b"observability-webhook-secret-32b").decode()
RULES = """
listen: {listen}
admin: {{listen: "{admin}", token: {token}}}
storage: {{url: "memory://", data_dir: "{data}"}}
upstreams:
  app: {{url: "http://127.0.0.1:{port}"}}
  gone: {{url: "http://127.0.0.1:{closed}", connect_timeout: 1s}}
limits:
  - {{name: per_key, key: "header:X-Key | ip", algorithm: fixed_window, limit: 3, window: 1h}}
  - {{name: preview, key: ip, algorithm: sliding_window_log, limit: 1, window: 1h, shadow: true}}
routes:
  - {{name: broken, match: {{path_prefix: /broken/}}, upstream: gone}}
  - {{name: api, match: {{path_prefix: /}}, upstream: app, limits: [per_key, preview]}}
redirects: {{prefix: /s/}}
notifications:
  aggregate: 100ms
  buffer: 1
  webhooks:
    - {{name: ops, url: "{hook}/ok", secret: "{secret}", events: ["*"]}}
    - {{name: refused, url: "{hook}/refuse", secret: "{secret}", events: [link.created]}}
    - {{name: retired, url: "{hook}/gone", secret: "{secret}", events: [link.created]}}
"""


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed: it comes with the Debian package `prometheus` "
            "(`make test` installs it as root via `scripts/ensure-binaries.sh promtool`; "
            "otherwise run `sudo apt-get install prometheus`)",
            pytrace=False,
        )
    return path


def run_promtool(
    *args: str, stdin: str | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
        check=False,
    )


# -- the text exposition format ----------------------------------------------------


@dataclass
class Family:
    name: str  # as in its TYPE line
    type: str
    samples: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    @property
    def series_names(self) -> set[str]:
        """The series names a family of this type exports in the classic text format:
        a histogram ``x`` exports ``x_bucket``, ``x_sum``, ``x_count``; a counter is
        declared under its ``_total`` name (prometheus-client's ``Counter("x")`` is
        ``x_total``); a gauge ``x`` is ``x``."""
        if self.type == "histogram":
            return {f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count"}
        if self.type == "summary":
            return {self.name, f"{self.name}_sum", f"{self.name}_count"}
        return {self.name}

    @property
    def labels(self) -> set[str]:
        return {label for _, labels in self.samples for label in labels} - {"le", "quantile"}


SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+\S+(?:\s+\S+)?$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_exposition(text: str) -> dict[str, Family]:
    """Families by TYPE name; every sample must belong to the family declared before it."""
    families: dict[str, Family] = {}
    current: Family | None = None
    for line in text.splitlines():
        if not line.strip() or line.startswith("# HELP"):
            continue
        if line.startswith("# TYPE"):
            _, _, name, type_ = line.split(maxsplit=3)
            current = families[name] = Family(name, type_)
            continue
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, labels = match[1], dict(LABEL.findall(match[2] or ""))
        assert current is not None and name in current.series_names, (
            f"{name} is not a series of the family declared before it ({current})"
        )
        current.samples.append((name, labels))
    return families


def exported(families: dict[str, Family]) -> dict[str, Family]:
    """Series name → its family: what a PromQL selector may name."""
    return {series: f for f in families.values() for series in f.series_names}


def sample_values(text: str, name: str, **labels: str) -> list[float]:
    values = []
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if line.startswith("#") or not match or match[1] != name:
            continue
        if labels.items() <= dict(LABEL.findall(match[2] or "")).items():
            values.append(float(line.rsplit(maxsplit=1)[1]))
    return values


# -- PromQL, as far as the checks need it -----------------------------------------

STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
METRIC = re.compile(r"(?<![\w:])(sluice[_:][\w:]*)(?![\w:])")
SELECTOR = re.compile(r"(?<![\w:])(sluice[_:][\w:]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
GRAFANA_VAR = re.compile(r"\$\{?(\w+)(?::\w+)?\}?")
LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*(\w+)\s*\)\s*$", re.S)


def without_strings(expr: str) -> str:
    return STRING.sub('""', expr)


def metric_names(expr: str) -> set[str]:
    return set(METRIC.findall(without_strings(expr)))


def grouping_labels(expr: str) -> set[str]:
    return {
        label.strip()
        for group in GROUPING.findall(without_strings(expr))
        for label in group.split(",")
        if label.strip()
    }


def as_promql(grafana_expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced, as Prometheus would get it."""

    def value(match: re.Match[str]) -> str:
        return "5m" if match[1].startswith("__") else ".*"

    return GRAFANA_VAR.sub(value, grafana_expr)


# -- the assets ---------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row keeps its panels inside


def dashboard_expressions() -> dict[str, str]:
    """Where → PromQL (Grafana variables kept), for every query the dashboard sends."""
    dashboard = load_dashboard()
    found: dict[str, str] = {}
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            found[f"panel {panel['id']} {panel['title']!r} {target['refId']}"] = target["expr"]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = LABEL_VALUES.match(query)
            assert match, f"variable {var['name']}: not label_values(selector, label): {query}"
            found[f"variable {var['name']}"] = f"group by ({match[2]}) ({match[1]})"
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            found[f"annotation {annotation['name']!r}"] = annotation["expr"]
    return found


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(ALERTS.read_text())["groups"]
    return groups


def rule_expressions() -> dict[str, str]:
    return {
        rule.get("alert") or rule["record"]: rule["expr"]
        for group in rule_groups()
        for rule in group["rules"]
    }


def recorded_labels() -> dict[str, set[str]]:
    """Recording rule name → the labels its series keep (its ``by`` clause)."""
    return {
        rule["record"]: grouping_labels(rule["expr"])
        for group in rule_groups()
        for rule in group["rules"]
        if "record" in rule
    }


# -- the live scrape ----------------------------------------------------------------


def write_config(path: Path, text: str) -> None:
    path.write_text(text)


async def start_app(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


@dataclass
class Receiver:
    """The webhook endpoints: ``/ok`` answers 204 (and records the event types it got),
    ``/refuse`` 400 (dead-lettered at once), ``/gone`` 410 (the subscription is disabled)."""

    types: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        async def accept(request: web.Request) -> web.Response:
            body = await request.json()
            self.types.extend(e["type"] for e in (body if isinstance(body, list) else [body]))
            return web.Response(status=204)

        async def refuse(request: web.Request) -> web.Response:
            await request.read()
            return web.Response(status=400, text="no thanks")

        async def gone(request: web.Request) -> web.Response:
            await request.read()
            return web.Response(status=410)

        app = web.Application()
        app.router.add_post("/ok", accept)
        app.router.add_post("/refuse", refuse)
        app.router.add_post("/gone", gone)
        return app


@dataclass
class Scrape:
    text: str  # /metrics after GET /api/webhooks (which refreshes the webhook gauges)
    before_api: str  # /metrics once every delivery outcome is counted, before that call


async def drive(sluice: Sluice, http: aiohttp.ClientSession) -> None:
    """Allowed, rejected and redirected requests, a 502, link events, and two reloads."""
    async with http.post(
        sluice.admin_url + "/api/links",
        json={"url": "https://example.com/docs", "code": "docs"},
        headers=AUTH,
    ) as r:
        assert r.status == 201, await r.text()
    statuses = []
    for _ in range(6):  # per_key: 3 per hour
        async with http.get(sluice.url + "/echo/items", headers={"X-Key": "alice"}) as r:
            statuses.append(r.status)
    assert statuses == [200, 200, 200, 429, 429, 429]

    async def redirect(code: str) -> int:
        async with http.get(sluice.url + "/s/" + code, allow_redirects=False) as r:
            return r.status

    # at once: the one-event buffer overflows, so events are dropped (and counted)
    assert set(await asyncio.gather(*(redirect("docs") for _ in range(20)))) == {302}
    assert await redirect("nope") == 404
    async with http.get(sluice.url + "/broken/x") as r:
        assert r.status == 502
    good = sluice.path.read_text()
    write_config(sluice.path, good + "bogus_key: 1\n")
    assert sluice.runtime.reload() is False
    write_config(sluice.path, good + "# edited\n")
    assert sluice.runtime.reload() is True


async def live_scrape(directory: Path) -> Scrape:
    received = Receiver()
    receiver, hook_port = await start_app(received.app())
    upstream, port = await start_app(make_upstream())
    try:
        path = write_rules(
            directory,
            RULES,
            token=TOKEN,
            data=directory / "data",
            port=port,
            closed=free_port(),
            hook=f"http://127.0.0.1:{hook_port}",
            secret=SECRET,
        )
        timeout = aiohttp.ClientTimeout(total=10)
        async with running(path) as sluice, aiohttp.ClientSession(timeout=timeout) as http:

            async def metrics() -> str:
                async with http.get(sluice.admin_url + "/metrics") as r:
                    assert r.status == 200
                    return await r.text()

            await drive(sluice, http)
            deadline = time.monotonic() + 10
            while True:  # until every subscription's outcome is counted
                text = await metrics()
                outcomes = {
                    hook: sum(sample_values(text, DELIVERIES, webhook=hook, result=result))
                    for hook, result in OUTCOMES.items()
                }
                if all(outcomes.values()) and "rate_limit.rejected" in received.types:
                    break
                assert time.monotonic() < deadline, f"{outcomes}, {received.types}:\n{text}"
                await asyncio.sleep(0.1)
            async with http.get(sluice.admin_url + "/api/webhooks", headers=AUTH) as r:
                assert r.status == 200
            return Scrape(text=await metrics(), before_api=text)
    finally:
        await upstream.cleanup()
        await receiver.cleanup()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Scrape:
    """One live Sluice, driven once; its /metrics text."""
    return asyncio.run(live_scrape(tmp_path_factory.mktemp("observability")))


@pytest.fixture
def scrape(live: Scrape) -> str:
    return live.text


# -- Prometheus: rules and config ------------------------------------------------------


def test_alert_rules_pass_promtool_check() -> None:
    result = run_promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alerts_fire_on_their_series_and_only_there() -> None:
    result = run_promtool("test", "rules", "alerts_test.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_documented_and_actionable() -> None:
    alerts = [rule for group in rule_groups() for rule in group["rules"] if "alert" in rule]
    names = [rule["alert"] for rule in alerts]
    assert len(names) == len(set(names))
    assert set(names) >= REQUIRED_ALERTS
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    tested = {case["alertname"] for t in tests for case in t["alert_rule_test"]}
    readme = (PROMETHEUS / "README.md").read_text()
    for rule in alerts:
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), f"{name}: no `for:`"
        assert rule["labels"]["severity"] in SEVERITIES, name
        assert rule["annotations"]["summary"].strip(), name
        assert len(rule["annotations"]["description"]) > 80, f"{name}: say what to do"
        assert name in tested, f"{name} has no case in alerts_test.yml"
        assert f"`{name}`" in readme, f"{name} is not explained in deploy/prometheus/README.md"
    expr = rule_expressions()
    assert "sluice_config_last_reload_successful == 0" in expr["SluiceConfigReloadFailing"]
    assert "sluice_storage_breaker_open" in expr["SluiceStorageDegraded"]


def test_example_prometheus_config_is_valid_and_matches_the_rules() -> None:
    result = run_promtool("check", "config", "prometheus.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert f'up{{job="{job["job_name"]}"}}' in rule_expressions()["SluiceDown"]


# -- the live scrape ---------------------------------------------------------------------


def test_the_scenario_produced_what_the_assets_show(scrape: str) -> None:
    def count(name: str, **labels: str) -> float:
        return sum(sample_values(scrape, name, **labels))

    assert count("sluice_requests_total", route="api", status_class="2xx") == 3
    assert count("sluice_requests_total", route="api", status_class="4xx") == 3
    assert count("sluice_requests_total", route="redirects", status_class="3xx") == 20
    assert count("sluice_requests_total", route="broken", status_class="5xx") == 1
    assert count("sluice_ratelimit_decisions_total", rule="per_key", result="allowed") == 3
    assert count("sluice_ratelimit_decisions_total", rule="per_key", result="rejected") == 3
    assert count("sluice_ratelimit_decisions_total", rule="preview", result="shadow_rejected") >= 1
    assert count("sluice_ratelimit_deny_cache_hits_total", rule="per_key") >= 1
    assert count("sluice_redirects_total", status="302") == 20
    assert count("sluice_redirects_total", status="404") == 1
    assert count("sluice_link_cache_total", result="hit") >= 1
    assert count("sluice_links_created_total") == 1
    assert count("sluice_upstream_errors_total", upstream="gone") == 1
    assert count("sluice_config_reloads_total", result="failed") == 1
    assert count("sluice_config_reloads_total", result="ok") == 1
    assert count("sluice_config_last_reload_successful") == 1
    assert count("sluice_events_emitted_total", type="link.created") == 1
    assert count("sluice_events_dropped_total", type="redirect.followed") >= 1
    assert count("sluice_webhook_deliveries_total", webhook="ops", result="delivered") >= 1
    assert count("sluice_webhook_deliveries_total", webhook="refused", result="dead") == 1
    assert count("sluice_webhook_deliveries_total", webhook="retired", result="gone") == 1
    # the webhook gauges (also checked below on a scrape taken before any API call)
    assert count("sluice_webhook_dead_letters", webhook="refused") == 1
    assert count("sluice_webhook_disabled", webhook="retired") == 1
    assert count("sluice_webhook_queue_depth", webhook="retired") == 1


def test_a_disabled_subscription_shows_in_its_gauges_without_the_api(live: Scrape) -> None:
    assert sum(sample_values(live.before_api, "sluice_webhook_disabled", webhook="retired")) == 1


def test_a_dead_letter_shows_in_its_gauge_without_the_api(live: Scrape) -> None:
    dead = sample_values(live.before_api, "sluice_webhook_dead_letters", webhook="refused")
    assert sum(dead) == 1


def test_aggregated_rejection_events_count_as_emitted(live: Scrape) -> None:
    emitted = sample_values(live.text, "sluice_events_emitted_total", type="rate_limit.rejected")
    assert sum(emitted) >= 1


def test_the_scrape_passes_promtool_check_metrics(scrape: str) -> None:
    result = run_promtool("check", "metrics", stdin=scrape)
    # exit 3: lint findings (e.g. naming), 1: a parse error; both must be fixed in Sluice
    assert result.returncode == 0, f"exit {result.returncode}:\n{result.stdout}{result.stderr}"


def test_every_metric_and_label_the_assets_query_is_exported(scrape: str) -> None:
    series = exported(parse_exposition(scrape))
    recorded = recorded_labels()
    expressions = {f"dashboard {k}": v for k, v in dashboard_expressions().items()}
    expressions |= {f"alerts.yml {k}": v for k, v in rule_expressions().items()}
    problems: list[str] = []
    unsampled: set[str] = set()
    for where, expr in expressions.items():
        names = metric_names(expr)
        known_labels = set(TARGET_LABELS) | {"le"}
        checkable = True
        for name in sorted(names):
            if name.startswith("sluice:"):
                if name not in recorded:
                    problems.append(f"{where}: {name} is recorded by no rule in alerts.yml")
                else:
                    known_labels |= recorded[name]
            elif name not in series:
                problems.append(f"{where}: {name} is not in the scrape")
            elif not series[name].samples:
                unsampled.add(series[name].name)
                checkable = False
            else:
                known_labels |= series[name].labels
        if not names and "up{" not in expr:
            problems.append(f"{where}: queries no Sluice metric: {expr}")
        stripped = without_strings(expr)
        for name, matchers in SELECTOR.findall(stripped):
            family = series.get(name)
            if family is None or not family.samples:
                continue
            allowed = family.labels | TARGET_LABELS
            if name.endswith("_bucket"):
                allowed.add("le")
            for label in MATCHER.findall(matchers):
                if label not in allowed:
                    problems.append(f"{where}: {name} has no label {label!r} ({sorted(allowed)})")
        if checkable:
            for label in grouping_labels(expr) - known_labels:
                problems.append(f"{where}: no metric of the expression has label {label!r}")
    assert not problems, "\n".join(problems)
    assert unsampled <= NO_SAMPLES_EXPECTED, (
        f"declared but never given a value in the scenario: {sorted(unsampled)}"
    )


def test_metric_names_resolve_by_family_type() -> None:
    families = parse_exposition(
        "# TYPE x_seconds histogram\n"
        'x_seconds_bucket{le="+Inf",op="a"} 1\n'
        'x_seconds_count{op="a"} 1\n'
        'x_seconds_sum{op="a"} 0.1\n'
        "# TYPE y_total counter\ny_total 3\n"
        "# TYPE z gauge\nz 1\n"
    )
    series = exported(families)
    assert {"x_seconds_bucket", "x_seconds_sum", "x_seconds_count", "y_total", "z"} == set(series)
    for wrong in ("x_seconds", "x_seconds_total", "y", "y_total_count", "z_total", "z_bucket"):
        assert wrong not in series
    assert series["x_seconds_bucket"].labels == {"op"}
    assert metric_names('sum by (op) (rate(sluice_a_total{k="sluice_b"}[5m])) / sluice:c') == {
        "sluice_a_total",
        "sluice:c",
    }
    assert grouping_labels("sum by (a, b) (x) / on (c) group_left (d) y") == {"a", "b", "c", "d"}


# -- Grafana -----------------------------------------------------------------------------


def test_dashboard_is_well_formed() -> None:
    dashboard = load_dashboard()
    assert dashboard["title"] and dashboard["uid"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert {"instance", "route", "rule"} <= set(variables)
    panels = list(all_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    cells: dict[tuple[int, int], int] = {}
    for panel in panels:
        where = f"panel {panel['id']} {panel.get('title')!r}"
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, where
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{where} overlaps panel {cells[x, y]}"
                cells[x, y] = panel["id"]
        if panel["type"] == "row":  # a section heading: holds no query
            assert "targets" not in panel, where
            continue
        assert panel["title"], where
        assert panel["datasource"] == {"type": "prometheus", "uid": DS}, where
        assert panel["targets"], f"{where}: no target"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), where
        for target in panel["targets"]:
            assert target["expr"].strip(), where
            assert target.get("datasource", panel["datasource"]) == panel["datasource"], where
    for where, expr in dashboard_expressions().items():
        for name in GRAFANA_VAR.findall(expr):
            assert name.startswith("__") or name in variables, f"{where}: ${name} undefined"


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    rules = [
        {"record": f"dashboard:query_{i}", "expr": as_promql(expr)}
        for i, expr in enumerate(dashboard_expressions().values())
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
