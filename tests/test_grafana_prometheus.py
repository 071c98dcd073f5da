"""The Grafana dashboard and the alert rules, checked for real: promtool, and a real Prometheus
scraping a running proxy that evaluates every PromQL expression they contain."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.backends import RecordingBackend
from tests.dnsserver import DnsServer
from tests.procs import free_port
from tests.smtpclient import RawClient, make_message

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "grafana" / "smtpproxy-dashboard.json"
ALERTS = ROOT / "grafana" / "alerts.yml"
PROVISIONING = ROOT / "grafana" / "provisioning"

PROMETHEUS = shutil.which("prometheus") or shutil.which("prometheus", path="/usr/bin:/usr/sbin")
PROMTOOL = shutil.which("promtool") or shutil.which("promtool", path="/usr/bin:/usr/sbin")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not installed (Debian package `prometheus`)"
)
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package `prometheus`)"
)

JOB_FILTER = 'job=~"$job"'
INSTANCE_FILTER = 'instance=~"$instance"'
# What Grafana would substitute; the test Prometheus has seconds of data, and
# rate() needs only two samples inside the window.
SUBSTITUTIONS = {
    "$__rate_interval": "1m",
    "$__range": "1h",
    "$__interval": "15s",
    "$job": ".*",
    "$instance": ".*",
}
# Families whose series exist once the traffic below was sent: dashboard
# expressions over them must return data, not just parse.
TRAFFIC_METRICS = {
    "smtpproxy_messages_total",
    "smtpproxy_recipients_total",
    "smtpproxy_connections_total",
    "smtpproxy_connections_active",
    "smtpproxy_connection_duration_seconds_bucket",
    "smtpproxy_backend_replies_total",
    "smtpproxy_backend_latency_seconds_bucket",
    "smtpproxy_backend_up",
    "smtpproxy_backend_pool_connections",
    "smtpproxy_backend_pool_in_use",
    "smtpproxy_message_size_bytes_bucket",
    "smtpproxy_data_duration_seconds_bucket",
    "smtpproxy_stage_duration_seconds_bucket",
    "smtpproxy_check_duration_seconds_bucket",
    "smtpproxy_build_info",
    "smtpproxy_auth_results_total",
    "smtpproxy_dmarc_policy_applied_total",
    "smtpproxy_dns_queries_total",
    "smtpproxy_dns_cache_lookups_total",
    "smtpproxy_dns_latency_seconds_bucket",
    "smtpproxy_rules_loaded",
    "smtpproxy_rule_reloads_total",
    "smtpproxy_rules_last_reload_timestamp_seconds",
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
}
# Sender domains the test DNS server answers for: SPF and DMARC pass for one,
# fail with p=reject for the other, so the authentication panels have data.
ZONE: dict[str, Any] = {
    "sender.example": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all")],
    "_dmarc.sender.example": [("TXT", "v=DMARC1; p=none")],
    "strict.example": [("TXT", "v=spf1 -all")],
    "_dmarc.strict.example": [("TXT", "v=DMARC1; p=reject")],
}
WAIT = 30.0

# -- PromQL helpers -------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.I)
_IDENT = re.compile(r"(?<![A-Za-z0-9_:.$])[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers that are neither calls nor keywords."""
    text = _STRING.sub('""', expr)
    text = _LABEL_LIST.sub(" ", text)
    text = _BRACES.sub(" ", text)
    text = _RANGE.sub(" ", text)
    names = set()
    for m in _IDENT.finditer(text):
        rest = text[m.end() :].lstrip()
        if rest.startswith("(") or m.group().lower() in _KEYWORDS:
            continue
        names.add(m.group())
    return names


def substitute(expr: str) -> str:
    """The expression as Grafana would send it with every variable set to All."""
    for var, value in SUBSTITUTIONS.items():
        expr = expr.replace(var, value)
    return expr


def exported_names(exposition: str) -> set[str]:
    """Sample names of every family on /metrics, including labelled families with no child yet."""
    names = set()
    for line in exposition.splitlines():
        parts = line.split()
        if len(parts) != 4 or parts[:2] != ["#", "TYPE"]:
            continue
        name, kind = parts[2], parts[3]
        if kind == "counter":
            names |= {name, name.removesuffix("_total") + "_created"}
        elif kind in ("histogram", "summary"):
            names |= {name + s for s in ("_sum", "_count", "_created")}
            if kind == "histogram":
                names.add(name + "_bucket")
            else:
                names.add(name)
        else:
            names.add(name)
    return names


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def data_panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that shows data, rows' nested panels included."""
    out: list[dict[str, Any]] = []
    for panel in dash["panels"]:
        if panel["type"] == "row":
            out += panel.get("panels", [])
        else:
            out.append(panel)
    return out


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, expr) for every panel target."""
    return [
        (f"panel {p['title']!r} target {t['refId']}", t["expr"])
        for p in data_panels(load_dashboard())
        for t in p["targets"]
    ]


def variable_selectors() -> list[tuple[str, str, str]]:
    """(variable, selector, label) of every label_values() template variable."""
    out = []
    for var in load_dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert m, f"variable {var['name']}: expected label_values(selector, label), got {query!r}"
        out.append((var["name"], m.group(1), m.group(2)))
    return out


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


# -- static checks ---------------------------------------------------------------


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (job, le) (rate(a_seconds_bucket{x="y{z}", job=~"$job"}[5m]))) '
        "/ on (job) group_left b_total offset 5m > bool 1e3 and time() - c:rule unless sum(d) without (le)"
    )
    assert metric_names(expr) == {"a_seconds_bucket", "b_total", "c:rule", "d"}
    # A renamed family is caught: the old name is no longer among the exported ones.
    exported = exported_names("# TYPE smtpproxy_mails_total counter\n# TYPE x_seconds histogram\n")
    assert metric_names("rate(smtpproxy_messages_total[1m])") - exported == {"smtpproxy_messages_total"}
    assert {"x_seconds_bucket", "x_seconds_count", "smtpproxy_mails_total"} <= exported


@needs_promtool
def test_promtool_accepts_the_alert_rules() -> None:
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout


def test_alert_rules_cover_the_issue_and_carry_summary_and_runbook() -> None:
    doc = yaml.safe_load(ALERTS.read_text())
    assert [g["name"] for g in doc["groups"]] == ["smtpproxy"]
    rules = alert_rules()
    for rule in rules:
        ann = rule.get("annotations", {})
        assert ann.get("summary") and ann.get("runbook"), f"alert {rule['alert']}: needs summary and runbook"
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
    text = {rule["alert"]: rule["expr"] for rule in rules}
    needed = {
        "backend unreachable": "smtpproxy_backend_up == 0",
        "backend erroring": "smtpproxy_backend_errors_total",
        "tempfail ratio": 'action="tempfailed"',
        "p99 latency": "histogram_quantile(0.99",
        "dns failures": "smtpproxy_dns_queries_total",
        "rules reload failing": 'smtpproxy_rule_reloads_total{outcome="failure"}',
        "no traffic": 'smtpproxy_messages_total{action="delivered"}[1h]',
        "target down": 'up{job="smtpproxy"} == 0',
    }
    for what, fragment in needed.items():
        assert any(fragment in expr for expr in text.values()), f"no alert for {what} ({fragment!r})"
    assert next(r for r in rules if "smtpproxy_backend_up == 0" in r["expr"])["for"] == "2m"


def test_dashboard_is_importable_json_with_inputs_and_variables() -> None:
    dash = load_dashboard()
    assert dash["schemaVersion"] >= 39
    assert dash["uid"] and dash["title"]
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    assert dash["__inputs"][0]["pluginId"] == "prometheus"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert {"job", "instance"} <= set(variables)
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    for name in ("job", "instance"):
        assert variables[name]["datasource"]["uid"] == "${DS_PROMETHEUS}"
    assert {v[0]: v[2] for v in variable_selectors()} == {"job": "job", "instance": "instance"}
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_every_panel_has_a_datasource_and_targets() -> None:
    panels = data_panels(load_dashboard())
    assert len(panels) >= 20
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
        assert p["targets"], f"panel {p['title']!r} has no targets"
        for t in p["targets"]:
            assert t["expr"].strip() and t["refId"], p["title"]
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
            assert "gridPos" in p


def test_dashboard_has_the_rows_of_the_issue() -> None:
    dash = load_dashboard()
    rows = {p["title"] for p in dash["panels"] if p["type"] == "row"}
    assert {
        "Traffic",
        "Verdict reasons",
        "Connections",
        "Authentication",
        "Latency",
        "Backend",
        "DNS",
    } <= rows
    assert "Rules and rate limits" in rows
    exprs = " ".join(e for _, e in dashboard_exprs())
    for fragment in (
        "sum by (action) (rate(smtpproxy_messages_total",
        "sum by (action, stage, reason)",
        "smtpproxy_recipients_total",
        "sum by (tls)",
        "smtpproxy_connections_rejected_total",
        'method="spf"',
        'method="dkim"',
        'method="dmarc"',
        'method="arc"',
        "smtpproxy_dmarc_policy_applied_total",
        "histogram_quantile(0.99, sum by (le) (rate(smtpproxy_data_duration_seconds_bucket",
        "histogram_quantile(0.5, sum by (le) (rate(smtpproxy_data_duration_seconds_bucket",
        "sum by (stage, le)",
        "sum by (check, le)",
        "smtpproxy_backend_latency_seconds_bucket",
        "smtpproxy_backend_errors_total",
        "smtpproxy_backend_pool_in_use",
        "topk(10, sum by (rule)",
        "topk(10, sum by (limit)",
        "smtpproxy_dns_cache_lookups_total",
        "smtpproxy_dns_latency_seconds_bucket",
    ):
        assert fragment in exprs, f"dashboard lacks {fragment!r}"


def test_every_dashboard_selector_filters_job_and_instance() -> None:
    for where, expr in dashboard_exprs():
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        for name in names:
            uses = list(re.finditer(rf"(?<![\w:]){re.escape(name)}(?![\w:])(\{{[^}}]*\}})?", expr))
            assert uses, f"{where}: {name} not found in {expr!r}"
            for use in uses:
                matchers = use.group(1) or ""
                assert JOB_FILTER in matchers and INSTANCE_FILTER in matchers, (
                    f"{where}: {name} must be filtered by {{{JOB_FILTER}, {INSTANCE_FILTER}}} in {expr!r}"
                )


def test_provisioning_examples_load() -> None:
    ds = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())
    assert ds["apiVersion"] == 1 and ds["datasources"][0]["type"] == "prometheus"
    dashboards = yaml.safe_load((PROVISIONING / "dashboards" / "smtpproxy.yaml").read_text())
    assert dashboards["apiVersion"] == 1 and dashboards["providers"][0]["type"] == "file"


# -- against a real Prometheus ---------------------------------------------------------


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except OSError:
        return 0, b""


async def http_get(url: str) -> tuple[int, bytes]:
    """GET in a thread: the proxy being scraped runs in this event loop and must keep serving."""
    return await asyncio.to_thread(_get, url)


class PrometheusProcess:
    """A real ``prometheus`` on loopback scraping one target every second."""

    def __init__(self, tmp: Path, target: str) -> None:
        assert PROMETHEUS is not None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": "smtpproxy", "static_configs": [{"targets": [target]}]}],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (tmp / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=tmp,
        )
        self.log_path = tmp / "prometheus.log"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()

    async def api(self, path: str, **params: str) -> dict[str, Any]:
        status, body = await http_get(f"{self.url}{path}?{urllib.parse.urlencode(params)}")
        try:
            data: dict[str, Any] = json.loads(body)
        except ValueError:
            data = {"status": "error", "error": f"HTTP {status}: {body[:200]!r}"}
        return data

    async def query(self, expr: str) -> dict[str, Any]:
        return await self.api("/api/v1/query", query=expr)

    async def wait_for(self, expr: str, what: str) -> None:
        """Poll (bounded) until ``expr`` returns data."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited: {self.log_path.read_text()[-2000:]}")
            res = await self.query(expr)
            if res.get("status") == "success" and res["data"]["result"]:
                return
            await asyncio.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what} ({expr})")


async def send_traffic(proxy: Any, backend: RecordingBackend) -> None:
    """Delivered, a backend-refused and a relay-denied recipient, tempfailed and rejected DATA,
    a DMARC p=reject failure."""
    backend.rcpt_replies["gone@example.org"] = "550 5.1.1 no"
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        r = await c.send_message(
            "a@sender.example", ["user@example.org", "gone@example.org"], make_message("1")
        )
        assert r.code == 250, r
        await c.cmd("QUIT")
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        r = await c.send_message("b@sender.example", ["someone@elsewhere.test"], make_message("2"))
        assert r.code == 550, r
        await c.cmd("QUIT")
    for reply, code in (("451 4.3.0 later", 451), ("554 5.6.0 no", 554)):
        backend.data_reply = reply
        async with RawClient(proxy.host, proxy.port) as c:
            await c.connect()
            r = await c.send_message("c@sender.example", ["user@example.org"], make_message(reply))
            assert r.code == code, r
            await c.cmd("QUIT")
    backend.data_reply = None
    spoof = (
        b"From: <x@strict.example>\r\nTo: <user@example.org>\r\nSubject: spoof\r\n"
        b"Message-ID: <spoof@strict.example>\r\nDate: Sat, 28 Nov 2026 10:00:00 +0000\r\n\r\nhi\r\n"
    )
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        r = await c.send_message("x@strict.example", ["user@example.org"], spoof)
        assert r.code == 550, r
        await c.cmd("QUIT")
    assert len(backend.messages) == 1


@needs_prometheus
async def test_every_expression_evaluates_against_a_real_prometheus(
    backend: RecordingBackend, start_proxy: Any, tmp_path: Path
) -> None:
    with DnsServer(dict(ZONE)) as dns:
        proxy = await start_proxy({"dns": {"nameservers": [dns.address], "timeout": 1.0}})
        assert proxy.metrics_url is not None
        await send_traffic(proxy, backend)
    status, body = await http_get(proxy.metrics_url + "/metrics")
    assert status == 200
    exported = exported_names(body.decode()) | {"up"}

    prom = PrometheusProcess(tmp_path, proxy.metrics_url.removeprefix("http://"))
    try:
        await prom.wait_for('up{job="smtpproxy"} == 1', "the proxy target to be up")
        # The traffic was sent before the first scrape, so every series has as many samples
        # as this one: three are enough for rate() over any window.
        await prom.wait_for("count_over_time(smtpproxy_connections_active[1m]) >= 3", "samples")
        await prom.wait_for('sum(smtpproxy_messages_total{action="delivered"}) == 1', "the delivered message")
        names = await prom.api("/api/v1/label/__name__/values")
        assert names["status"] == "success"
        known = exported | set(names["data"])
        assert known >= TRAFFIC_METRICS

        failures: list[str] = []
        expressions = dashboard_exprs() + [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]
        expressions += [(f"variable ${v}", sel) for v, sel, _ in variable_selectors()]
        for where, raw in expressions:
            expr = substitute(raw)
            res = await prom.query(expr)
            if res.get("status") != "success":
                failures.append(f"{where}: does not evaluate: {res.get('error')} in {expr!r}")
                continue
            unknown = metric_names(expr) - known
            if unknown:
                failures.append(f"{where}: references metrics the proxy does not export: {sorted(unknown)}")
            wants_data = not where.startswith("alert") and metric_names(expr) & TRAFFIC_METRICS
            if wants_data and not res["data"]["result"]:
                failures.append(f"{where}: no data after traffic for {expr!r}")
        assert not failures, "\n".join(failures)

        # Template variables find this job and instance.
        for var, selector, label in variable_selectors():
            res = await prom.query(substitute(selector))
            values = {s["metric"].get(label) for s in res["data"]["result"]}
            expected = "smtpproxy" if label == "job" else proxy.metrics_url.removeprefix("http://")
            assert expected in values, f"variable ${var}: {values}"

        # Prometheus loaded and evaluated every alert rule without error.
        deadline = time.monotonic() + WAIT
        while True:
            rules = await prom.api("/api/v1/rules")
            loaded = [r for g in rules["data"]["groups"] for r in g["rules"]]
            if len(loaded) == len(alert_rules()) and all(
                r.get("lastEvaluation", "").startswith("2") for r in loaded
            ):
                break
            assert time.monotonic() < deadline, f"rules not evaluated: {loaded}"
            await asyncio.sleep(0.5)
        assert all(r["health"] == "ok" for r in loaded), [(r["name"], r.get("lastError")) for r in loaded]
        firing = {r["name"] for r in loaded if r["state"] != "inactive"}
        assert "SmtpproxyTargetDown" not in firing and "SmtpproxyBackendUnreachable" not in firing
    finally:
        prom.stop()


@needs_promtool
def test_tls_handshake_alert_fires_on_certificate_failures_only(tmp_path: Path) -> None:
    # promtool's own rule unit tests: synthetic series, 30 minutes of evaluation.
    assert PROMTOOL is not None
    labels = 'job="smtpproxy", instance="mx1:9125"'
    rule = next(r for r in alert_rules() if r["alert"] == "SmtpproxyTlsHandshakesFailing")
    runbook = rule["annotations"]["runbook"]
    cases = {
        # Half the handshakes fail on our certificate: the alert fires.
        "certificate": ("certificate", [{"alertname": "SmtpproxyTlsHandshakesFailing"}]),
        # Clients that vanish mid-handshake are noise, not our problem: silent.
        "closed": ("closed", []),
    }
    for name, (reason, expected) in cases.items():
        spec = {
            "rule_files": [str(ALERTS)],
            "evaluation_interval": "1m",
            "tests": [
                {
                    "interval": "1m",
                    "input_series": [
                        {
                            "series": f'smtpproxy_tls_handshake_failures_total{{{labels}, reason="{reason}"}}',
                            "values": "0+60x40",
                        },
                        {
                            "series": f'smtpproxy_connections_total{{{labels}, tls="tls"}}',
                            "values": "0+60x40",
                        },
                    ],
                    "alert_rule_test": [
                        {
                            "eval_time": "35m",
                            "alertname": "SmtpproxyTlsHandshakesFailing",
                            "exp_alerts": [
                                {
                                    "exp_labels": {
                                        "job": "smtpproxy",
                                        "instance": "mx1:9125",
                                        "severity": "warning",
                                    },
                                    "exp_annotations": {
                                        "summary": "smtpproxy mx1:9125: 50% of STARTTLS handshakes fail",
                                        "runbook": runbook,
                                    },
                                }
                            ]
                            if expected
                            else [],
                        }
                    ],
                }
            ],
        }
        path = tmp_path / f"{name}.yml"
        path.write_text(yaml.safe_dump(spec))
        done = subprocess.run(
            [PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, name + ": " + done.stdout + done.stderr
