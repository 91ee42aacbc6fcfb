"""Every dashboard query and alert rule, run on a real Prometheus scraping two real splitstream replicas.

Processes as operators run them: three `splitstream sim-backend` runtimes (stable: instant; canary: 300 ms
to first token and half its answers 500; shadow candidate), two `splitstream serve` replicas on the same
rules (split, shadow, cache, a rollout), `prometheus` scraping both every second with dashboards/alerts.yml
loaded, and `splitstream load` sending a mixed load (sticky subjects, streams, repeated temperature-0
prompts). One stack per module; waiting for Prometheus to have scraped is bounded polling of its HTTP API.
"""

from __future__ import annotations

import json
import math
import platform
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import proxy as package
from tests import grafana
from tests.processes import free_port

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 30.0  # seconds for a process to answer HTTP (they need well under one)
CATCH_UP_TIMEOUT = 30.0  # seconds for Prometheus to scrape and evaluate what the proxies served (a few)
BACKENDS = ("stable-1", "canary-1", "next-1")
VARIANTS = ("stable", "canary")
# Counter families whose Prometheus sums must reach the proxies' own before the queries run.
COUNTERS = ("requests_total", "tokens_total", "split_assignments_total", "shadow_requests_total",
            "shadow_comparisons_total", "cache_requests_total", "upstream_errors_total")

RULES = """
backends:
  stable-1: {{url: "http://127.0.0.1:{stable}", kind: vllm}}
  canary-1: {{url: "http://127.0.0.1:{canary}", kind: vllm}}
  next-1: {{url: "http://127.0.0.1:{next}", kind: vllm}}
pools:
  stable: {{backends: [stable-1], model: sim-model}}
  canary: {{backends: [canary-1], model: sim-model}}
  next: {{backends: [next-1], model: sim-model}}
health: {{failures: 1000}}  # the canary's 500s must stay 500s (counted per variant), not become an ejection
tenants:  # `splitstream load` sends `Bearer splitstream-load`: all its traffic is this tenant's (no limits)
  load: {{key_hashes: ["sha256:49832db4085f20394eecf2375ac1f9ea1f4ecf219d81401d198cbe528943c4ea"]}}
routes:
  - name: chat
    match: {{model: my-model}}
    split:
      sticky: {{by: "header:x-user-id", ttl: 1h}}
      variants:
        - {{name: stable, pool: stable, weight: 50}}
        - {{name: canary, pool: canary, weight: 50}}
    shadow: [{{pool: next, sample: 1.0, max_queue: 1000}}]
    cache: {{ttl: 10m}}
    retry: {{attempts: 1}}
    # Holds at its first step (50/50, as the weights say) for the whole test: the rollout series exist. Its
    # webhook goes where nothing serves it (the runtime answers 404, which is final): each replica counts its
    # `started` announcement as failed, so the webhook series exists too.
    rollout: {{candidate: canary, baseline: stable, steps: [50, 100], interval: 1h, min_requests: 1000000,
               webhooks: [{{url: "http://127.0.0.1:{stable}/rollout-webhook"}}]}}
"""


class Processes:
    """Child processes of this module, output to files; stopped by PID (SIGTERM, then SIGKILL)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.directory / f"{name}.log").open("wb")
        proc = subprocess.Popen(args, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()  # the child holds its own descriptor
        self.procs[name] = proc
        return proc

    def splitstream(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        return self.start(name, sys.executable, "-m", "proxy", *args)

    def log_tail(self, name: str) -> str:
        return (self.directory / f"{name}.log").read_text(errors="replace")[-3000:]

    def wait_http(self, name: str, url: str) -> None:
        """Poll `url` until it answers 200 (the process is external: nothing to await), or fail with its log."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if self.procs[name].poll() is not None:
                raise AssertionError(f"{name} exited ({self.procs[name].returncode}): {self.log_tail(name)}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} not answering {url} after {STARTUP_TIMEOUT}s: {self.log_tail(name)}")
            time.sleep(0.05)

    def stop_all(self) -> None:
        for proc in reversed(self.procs.values()):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class Stack:
    prometheus: str  # base URL
    proxies: list[str]  # base URLs of the replicas
    started: float  # wall-clock time before the replicas started
    loads: list[dict[str, Any]] = field(default_factory=list)  # `splitstream load` summaries

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.api(f"/api/v1/query?{urllib.parse.urlencode({'query': expr})}")["result"])

    def query_range(self, expr: str, start: float) -> list[dict[str, Any]]:
        """`expr` every second from `start` to now, as a Grafana panel or annotation asks for it."""
        query = urllib.parse.urlencode({"query": expr, "start": start, "end": time.time(), "step": 1})
        return list(self.api(f"/api/v1/query_range?{query}")["result"])

    def api(self, path: str) -> Any:
        try:
            with urllib.request.urlopen(f"{self.prometheus}{path}", timeout=10) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as exc:  # Prometheus explains a bad query in the body
            raise AssertionError(f"{path}: {exc.code} {exc.read().decode(errors='replace')}") from None
        assert answer["status"] == "success", answer
        return answer["data"]

    def scrape(self, proxy: str) -> str:
        with urllib.request.urlopen(f"{proxy}/metrics", timeout=10) as response:
            return str(response.read().decode())

    def wait_for(self, what: str, condition: Callable[[], bool]) -> None:
        """Poll until `condition()` (Prometheus scrapes and evaluates on its own clock)."""
        deadline = time.monotonic() + CATCH_UP_TIMEOUT
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"Prometheus did not catch up after {CATCH_UP_TIMEOUT}s: {what}")
            time.sleep(0.1)


def counter_sums(text: str) -> dict[str, float]:
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_total"):
                sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    return sums


def send_load(stack: Stack, count: int, rate: float, seed: int) -> None:
    args = [sys.executable, "-m", "proxy", "load", "--model", "my-model", "--count", str(count), "--rate", str(rate),
            "--concurrency", "16", "--users", "1000", "--stream-share", "0.5", "--repeat-share", "0.3",
            "--max-tokens", "8", "--seed", str(seed)]
    for proxy in stack.proxies:
        args += ["--url", f"{proxy}/v1"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["sent"] == count and summary["by_status"].get("error", 0) == 0, summary
    stack.loads.append(summary)


def wait_until_scraped(stack: Stack) -> None:
    """Until Prometheus holds, for every counter family, at least what the replicas serve right now."""
    served: dict[str, float] = {}
    for proxy in stack.proxies:
        for name, value in counter_sums(stack.scrape(proxy)).items():
            served[name] = served.get(name, 0.0) + value
    wanted = {f"splitstream_{name}": served.get(f"splitstream_{name}", 0.0) for name in COUNTERS}
    assert all(wanted.values()), f"the load left a counter family empty: {wanted}"

    def caught_up() -> bool:
        seen = {r["metric"]["__name__"]: float(r["value"][1])
                for r in stack.query('sum by (__name__) ({__name__=~"splitstream_.+_total"})')}
        return all(seen.get(name, 0.0) >= value for name, value in wanted.items())

    stack.wait_for(f"counters {wanted}", caught_up)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: run .ci/run, or apt-get install prometheus")
    directory = tmp_path_factory.mktemp("dashboards")
    procs = Processes(directory)
    started = time.time()
    try:
        ports = {name: free_port() for name in ("stable", "canary", "next")}
        sims = {"stable": ("--ttft-ms", "0", "--tokens-per-second", "0", "--prefix-cache-tokens", "65536"),
                "canary": ("--ttft-ms", "300", "--tokens-per-second", "0", "--fail-rate", "0.5", "--max-batch", "64"),
                "next": ("--ttft-ms", "0", "--tokens-per-second", "0")}
        for name, options in sims.items():
            procs.splitstream(f"sim-{name}", "sim-backend", "--port", str(ports[name]), "--model", "sim-model",
                              *options)
        for name, port in ports.items():
            procs.wait_http(f"sim-{name}", f"http://127.0.0.1:{port}/health")

        rules = directory / "rules"
        rules.mkdir()
        (rules / "rules.yaml").write_text(RULES.format(**ports))
        proxies = []
        for replica in (1, 2):
            port = free_port()
            procs.splitstream(f"splitstream-{replica}", "serve", "--rules", str(rules), "--port", str(port),
                              "--no-watch")
            procs.wait_http(f"splitstream-{replica}", f"http://127.0.0.1:{port}/healthz")
            proxies.append(f"http://127.0.0.1:{port}")

        port = free_port()
        config = directory / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(grafana.ALERTS)],
            "scrape_configs": [{"job_name": "splitstream",
                                "static_configs": [{"targets": [p.removeprefix("http://") for p in proxies]}]}],
        }))
        procs.start("prometheus", binary, f"--config.file={config}", f"--storage.tsdb.path={directory / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn")
        procs.wait_http("prometheus", f"http://127.0.0.1:{port}/-/ready")
        stack = Stack(f"http://127.0.0.1:{port}", proxies, started)

        # Warm-up: every series exists and has been scraped once, so the main load shows up in rate().
        send_load(stack, count=40, rate=0, seed=1)
        wait_until_scraped(stack)
        # Main load, paced over a few scrapes.
        send_load(stack, count=150, rate=50, seed=2)
        wait_until_scraped(stack)
        yield stack
    finally:
        procs.stop_all()


def regex_value(value: str) -> str:
    """A label value inside a PromQL regex string, escaped as Grafana does for Prometheus."""
    return re.sub(r"[.*+?^${}()|\[\]\\]", lambda m: "\\\\" + m.group(0), value)


@pytest.fixture(scope="module")
def variable_values(stack: Stack) -> dict[str, dict[str, str]]:
    """Per dashboard, each variable as Grafana sends it for 'All': a regex of every value its query finds."""
    values: dict[str, dict[str, str]] = {}
    for name, board in grafana.dashboards().items():
        found = dict(grafana.BUILTIN_VARIABLES)
        for variable in grafana.variables(board):
            if variable["type"] != "query":
                continue
            match = re.fullmatch(r"label_values\((.+), (\w+)\)", grafana.variable_query(variable))
            assert match is not None, variable
            selector, label = match.groups()
            result = stack.query(f"group by ({label}) ({grafana.substitute(selector, found)})")
            labels = sorted(r["metric"][label] for r in result)
            assert labels, f"{name}: variable {variable['name']} has no values"
            found[variable["name"]] = "(" + "|".join(regex_value(v) for v in labels) + ")"
        values[name] = found
    return values


def has_finite_value(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(r["value"][1])) for r in result)


def test_the_load_reached_both_variants_and_the_canary_failed(stack: Stack) -> None:
    total: dict[str, int] = {}
    for summary in stack.loads:
        for key, n in [*summary["by_variant"].items(), *summary["by_status"].items()]:
            total[key] = total.get(key, 0) + n
    assert total.get("stable", 0) > 0 and total.get("canary", 0) > 0 and total.get("5xx", 0) > 0, total
    per_variant = stack.query('sum by (variant) (splitstream_requests_total{status="5xx"})')
    assert {r["metric"]["variant"] for r in per_variant} == {"canary"}
    assert stack.query('sum(splitstream_cache_requests_total{result="hit"}) > 0'), "no cache hits"


def test_template_variables_find_the_rule_names(stack: Stack, variable_values: dict[str, dict[str, str]]) -> None:
    replicas = sorted(regex_value(p.removeprefix("http://")) for p in stack.proxies)
    for board in ("split", "backends"):
        assert variable_values[board]["job"] == "(splitstream)"
        assert variable_values[board]["instance"] == "(" + "|".join(replicas) + ")"
    assert variable_values["split"]["route"] == "(chat)"
    assert variable_values["split"]["variant"] == "(canary|stable)"
    assert variable_values["backends"]["backend"] == "(" + "|".join(sorted(BACKENDS)) + ")"
    assert set(variable_values["backends"]["pool"].strip("()").split("|")) == {"stable", "canary", "next"}


@pytest.mark.parametrize("query", grafana.panel_queries(), ids=lambda q: q.name)
def test_panel_query_returns_data(stack: Stack, variable_values: dict[str, dict[str, str]],
                                  query: grafana.Query) -> None:
    expr = grafana.substitute(query.expr, variable_values[query.dashboard])
    result = stack.query(expr)
    assert result, f"no data: {expr}"
    assert has_finite_value(result), f"only NaN/Inf: {expr} -> {result}"


def annotation_queries() -> list[tuple[str, str, str]]:
    return [(name, annotation["name"], annotation["expr"])
            for name, board in grafana.dashboards().items() for annotation in board["annotations"]["list"]]


def group_rules(group: str) -> list[dict[str, Any]]:
    [rules] = [g["rules"] for g in grafana.rule_groups() if g["name"] == group]
    return list(rules)


@pytest.mark.parametrize("rule", group_rules("splitstream-rollout"), ids=lambda r: r.get("alert") or r["record"])
def test_rule_expression_returns_data(stack: Stack, rule: dict[str, Any]) -> None:
    result = stack.query(rule["expr"])
    assert has_finite_value(result), f"no data: {rule['expr']} -> {result}"
    if "alert" in rule:  # the canary is worse on both counts; stable must never be the one flagged
        assert {(r["metric"]["route"], r["metric"]["variant"]) for r in result} == {("chat", "canary")}


@pytest.mark.parametrize("rule", group_rules("splitstream-operations"), ids=lambda r: r["alert"])
def test_operational_alerts_stay_quiet_on_a_healthy_fleet(stack: Stack, rule: dict[str, Any]) -> None:
    """Every replica up, every pool healthy, no reload, no queue, the embedded store: nothing to page about
    (a failing canary is the rollout group's business). tests/integration/test_alerts.py makes each fire."""
    assert stack.query(rule["expr"]) == []


@pytest.mark.parametrize(("board", "name", "expr"), annotation_queries(), ids=lambda v: str(v).replace(" ", "-"))
def test_annotation_query_is_valid_and_marks_the_rollout_start(stack: Stack, variable_values: dict[str, dict[str, str]],
                                                                 board: str, name: str, expr: str) -> None:
    """Over the stack's life, as Grafana asks (a range query): the rollout's `start`, the first transition of
    its series (which increase() alone cannot see), is marked; no rules changed, so nothing else is."""
    result = stack.query_range(grafana.substitute(expr, variable_values[board]), stack.started)
    marked = {(r["metric"].get("route"), r["metric"].get("action")) for r in result}
    assert marked == ({("chat", "start")} if name == "Rollout transitions" else set()), (name, result)


def test_prometheus_loaded_the_rules_and_the_canary_alerts_are_pending(stack: Stack) -> None:
    groups = stack.api("/api/v1/rules")["groups"]
    loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert set(loaded) == {rule.get("alert") or rule["record"] for rule in grafana.rules()}

    def alerting() -> set[tuple[str, str, str]]:
        return {(a["labels"]["alertname"], a["labels"].get("variant", "-"), a["state"])
                for a in stack.api("/api/v1/alerts")["alerts"]}

    wanted = {("SplitstreamCanaryErrorRate", "canary", "pending"), ("SplitstreamCanaryLatencyP95", "canary", "pending")}
    stack.wait_for(f"alerts {wanted}", lambda: alerting() == wanted)  # `for: 5m`: pending, and only the canary
    assert all(rule["health"] == "ok" for group in stack.api("/api/v1/rules")["groups"] for rule in group["rules"])


def test_exposition_matches_the_metric_contract(stack: Stack) -> None:
    contract = grafana.metric_contract()
    rule_names = {"route": {"chat"}, "variant": set(VARIANTS), "backend": set(BACKENDS),
                  "pool": {"stable", "canary", "next"}, "version": {package.__version__},
                  "python": {platform.python_version()}, "tenant": {"load"},
                  "code": {str(code) for code in range(100, 600)}}
    extra = {"route": {"none"}, "variant": {"none"}, "backend": {"none", "cache"}}
    for proxy in stack.proxies:
        families = {}
        for family in text_string_to_metric_families(stack.scrape(proxy)):
            name = family.name + "_total" if family.type == "counter" else family.name
            families[name] = family
        splitstream = {name for name in families if name.startswith("splitstream_")}
        assert splitstream == set(contract), (splitstream - set(contract), set(contract) - splitstream)
        for name, metric in contract.items():
            family = families[name]
            assert family.type == metric.type, name
            # The stack's one tenant has no limits: nothing is refused for being over one; its route has no
            # fallback pools (the canary's failures must reach its clients, for the canary alerts).
            refusals = name in ("splitstream_ratelimited_total", "splitstream_fallbacks_total")
            assert bool(family.samples) != refusals, f"{name}: samples after the mixed load?"
            for sample in family.samples:
                labels = dict(sample.labels)
                if metric.type == "histogram" and sample.name.endswith("_bucket"):
                    assert labels.pop("le")
                assert tuple(sorted(labels)) == tuple(sorted(metric.labels)), (sample.name, labels)
                for label, value in labels.items():
                    allowed = metric.closed.get(label) or rule_names[label] | extra.get(label, set())
                    assert value in allowed, (name, label, value)


def test_latency_buckets_span_llm_answers(stack: Stack) -> None:
    text = stack.scrape(stack.proxies[0])

    def bounds(metric: str) -> list[float]:
        return sorted({float(s.labels["le"]) for f in text_string_to_metric_families(text) for s in f.samples
                       if s.name == f"{metric}_bucket"})

    duration = bounds("splitstream_request_duration_seconds")
    ttft = bounds("splitstream_time_to_first_token_seconds")
    assert duration[0] <= 0.01 and 600 <= duration[-2] and duration[-1] == math.inf  # cached ms .. 10-min streams
    assert ttft[0] <= 0.005 and 60 <= ttft[-2]
