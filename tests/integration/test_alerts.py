"""The operational alerts of dashboards/alerts.yml on a real Prometheus scraping a real splitstream, then
`promtool test rules` playing that process's own series past each `for:`.

Processes as operators run them: a `splitstream sim-backend`, a `redis-server`, and one `splitstream serve`
(on that Redis, watching its rules directory) whose rules have a pool on the runtime and a pool whose only
backend is a closed port; `prometheus` (1 s scrapes and evaluations, dashboards/alerts.yml) scrapes the proxy
and a second target where nothing listens. The fixture then applies a valid rule edit, a broken one, and
stops Redis, sampling the proxy's /metrics before and after.

Why both: alerts with `for: 1m` fire a minute after their condition holds, and waiting that out per run is
the slow part; Prometheus's pending state already shows that each expression matches what the real process
serves, with the labels it will fire with. `promtool test rules` then shows them firing after `for:`, with
their labels and annotations (runbook_url included), from the same process's samples on promtool's clock.
The refused-reload alert has no `for:` and fires live. Waiting is bounded polling of the processes' HTTP
(they are other processes: there is no event to await).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import grafana
from tests.integration.conftest import RedisServer
from tests.integration.test_dashboards import Processes, Stack, regex_value
from tests.processes import free_port

JOB = "splitstream"
STEP_SECONDS = 15  # promtool's sample and evaluation interval
BEFORE_STEPS = 20  # 5 minutes of the "before" samples, then the "after" ones
AFTER_STEPS = 100  # 25 minutes: past the 15-minute window of the event alerts
RULES = """
backends:
  live-1: {{url: "http://127.0.0.1:{live}", kind: vllm}}
  dead-1: {{url: "http://127.0.0.1:{dead}", kind: vllm}}  # nothing listens there
pools:
  live: {{backends: [live-1], model: sim-model}}
  dead: {{backends: [dead-1], model: sim-model}}
health: {{interval: 1s, unhealthy_interval: 1s, failures: 1}}
routes:
  - name: chat
    match: {{model: my-model}}
    pool: live
  - name: ghost
    match: {{model: ghost-model}}
    pool: dead
"""
VALID_EDIT = """
routes:
  - name: extra
    match: {model: extra-model}
    pool: live
"""
BROKEN_EDIT = """
routes:
  - name: typo
    match: {model: typo-model}
    pool: liv
"""


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class Scene:
    stack: Stack
    proxy: str  # host:port, the `instance` label
    dead_target: str  # host:port where nothing listens (a second scrape target)
    before: Samples  # the proxy's /metrics once it served, before any fault
    after: tuple[tuple[float, Samples], tuple[float, Samples]]  # two samplings once every fault is in place
    up: dict[str, float]  # Prometheus's `up` per instance, after the faults


def samples(text: str) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def poll(what: str, condition: Callable[[], bool], timeout: float = 30.0,
         seen: Callable[[], object] = lambda: "") -> None:
    """Until `condition()`: bounded polling of another process; on timeout, `seen()` says what was there."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not after {timeout}s: {what} {seen()}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: run .ci/run, or apt-get install prometheus")
    directory = tmp_path_factory.mktemp("alerts")
    procs = Processes(directory)
    redis = RedisServer(directory)
    started = time.time()
    try:
        redis.start()
        live = free_port()
        procs.splitstream("sim", "sim-backend", "--port", str(live), "--model", "sim-model")
        procs.wait_http("sim", f"http://127.0.0.1:{live}/health")
        rules = directory / "rules"
        rules.mkdir()
        (rules / "rules.yaml").write_text(RULES.format(live=live, dead=free_port()))
        port = free_port()
        procs.splitstream("splitstream", "serve", "--rules", str(rules), "--port", str(port), "--redis", redis.url)
        proxy = f"127.0.0.1:{port}"
        procs.wait_http("splitstream", f"http://{proxy}/healthz")
        dead_target = f"127.0.0.1:{free_port()}"

        prometheus = free_port()
        config = directory / "prometheus.yml"
        config.write_text(json.dumps({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(grafana.ALERTS)],
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [proxy, dead_target]}]}],
        }))
        procs.start("prometheus", binary, f"--config.file={config}", f"--storage.tsdb.path={directory / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prometheus}", "--log.level=warn")
        procs.wait_http("prometheus", f"http://127.0.0.1:{prometheus}/-/ready")
        stack = Stack(f"http://127.0.0.1:{prometheus}", [f"http://{proxy}"], started)

        def scrape() -> Samples:
            return samples(stack.scrape(stack.proxies[0]))

        def scraped(condition: str) -> bool:  # Prometheus holds what the proxy served
            return bool(stack.query(condition))

        before = scrape()
        stack.wait_for("the first scrapes", lambda: scraped(f'splitstream_rules_generation{{instance="{proxy}"}} == 1'))
        (rules / "extra.yaml").write_text(VALID_EDIT)  # a reload that applies: generation 2
        poll("generation 2", lambda: value(scrape(), "splitstream_rules_generation") == 2)
        stack.wait_for("generation 2 scraped",
                       lambda: scraped(f'splitstream_rules_generation{{instance="{proxy}"}} == 2'))
        (rules / "typo.yaml").write_text(BROKEN_EDIT)  # refused: generation 2 keeps serving
        poll("a refused reload", lambda: value(scrape(), "splitstream_rules_reloads_total", result="error") == 1)
        redis.stop()  # the store goes away under the running proxy
        poll("a dropped statistics flush",
             lambda: (value(scrape(), "splitstream_stats_flushes_total", result="dropped") or 0) >= 1)
        poll("the dead pool seen unhealthy",
             lambda: value(scrape(), "splitstream_pool_healthy_backends", pool="dead") == 0)
        first = (time.monotonic(), scrape())
        poll("more dropped flushes", lambda: (value(scrape(), "splitstream_stats_flushes_total", result="dropped") or 0)
             > (value(first[1], "splitstream_stats_flushes_total", result="dropped") or 0) + 2)
        second = (time.monotonic(), scrape())
        stack.wait_for("the dead target scraped", lambda: scraped(f'up{{instance="{dead_target}"}} == 0'))
        up = {r["metric"]["instance"]: float(r["value"][1]) for r in stack.query(f'up{{job="{JOB}"}}')}
        yield Scene(stack, proxy, dead_target, before, (first, second), up)
    finally:
        procs.stop_all()
        redis.stop()


# ------------------------------------------------------------------------------------------ live Prometheus


def operational_alerts() -> dict[str, dict[str, Any]]:
    [rules] = [g["rules"] for g in grafana.rule_groups() if g["name"] == "splitstream-operations"]
    return {rule["alert"]: rule for rule in rules}


def test_prometheus_holds_the_faults_as_alerts(scene: Scene) -> None:
    """Each fault shows up as its alert, with the labels it fires with, and nothing else does: those with
    `for: 1m` pending (or, on a slow run, already firing), the refused reload (no `for:`) firing."""
    wanted = {
        ("SplitstreamNoHealthyBackend", scene.proxy, "dead"),
        ("SplitstreamTargetDown", scene.dead_target, "-"),
        ("SplitstreamStoreUnavailable", scene.proxy, "-"),
        ("SplitstreamRulesReloadRefused", scene.proxy, "-"),
    }

    def alerts() -> list[dict[str, Any]]:
        return list(scene.stack.api("/api/v1/alerts")["alerts"])

    def active() -> set[tuple[str, str, str]]:
        return {(a["labels"]["alertname"], a["labels"]["instance"], a["labels"].get("pool", "-")) for a in alerts()}

    # A minute's rate windows: the store alert holds once dropped flushes outnumber the ok ones in the last one.
    poll(f"alerts {wanted}", lambda: active() == wanted, timeout=90, seen=active)
    states = {a["labels"]["alertname"]: a["state"] for a in alerts()}
    assert states.pop("SplitstreamRulesReloadRefused") == "firing"
    assert set(states.values()) <= {"pending", "firing"}, states
    [refused] = [a for a in alerts() if a["labels"]["alertname"] == "SplitstreamRulesReloadRefused"]
    rule = operational_alerts()["SplitstreamRulesReloadRefused"]
    assert refused["labels"] == {"alertname": "SplitstreamRulesReloadRefused", "job": JOB,
                                 "instance": scene.proxy, "result": "error", "severity": "warning"}
    assert refused["annotations"]["runbook_url"] == rule["annotations"]["runbook_url"]
    assert refused["annotations"]["summary"] == f"{scene.proxy} refused to load its rule files"


def test_every_operational_rule_is_healthy_on_real_series(scene: Scene) -> None:
    groups = {g["name"]: g for g in scene.stack.api("/api/v1/rules")["groups"]}
    rules = groups["splitstream-operations"]["rules"]
    assert {rule["name"] for rule in rules} == set(operational_alerts())
    assert all(rule["health"] == "ok" for rule in rules), [(r["name"], r.get("lastError")) for r in rules]


def test_annotations_mark_the_reload_and_the_refusal(scene: Scene) -> None:
    """The dashboards' annotation queries, as Grafana sends them for this replica, over the scene's life."""
    values = {**grafana.BUILTIN_VARIABLES, "job": f"({JOB})", "instance": f"({regex_value(scene.proxy)})",
              "route": "(.*)"}
    for name, board in grafana.dashboards().items():
        marks = {a["name"]: scene.stack.query_range(grafana.substitute(a["expr"], values), scene.stack.started)
                 for a in board["annotations"]["list"]}
        assert [r["metric"]["instance"] for r in marks["Rule reloads"]] == [scene.proxy], name
        assert [r["metric"]["instance"] for r in marks["Refused rule reloads"]] == [scene.proxy], name
        assert marks["Rollout transitions"] == [], name  # these rules have no rollout


# ------------------------------------------------------------------------------------------ promtool


def rule_series(found: Samples) -> Samples:
    """The samples of the metrics the operational rules read (histogram parts by their family name)."""
    contract = grafana.metric_contract()
    read = set().union(*(grafana.metrics_in(rule["expr"], contract) for rule in operational_alerts().values()))
    return {key: v for key, v in found.items() if grafana.family_name(key[0], contract) in read}


def series_name(name: str, labels: dict[str, str]) -> str:
    inner = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def input_series(scene: Scene) -> list[dict[str, str]]:
    """Each series the rules read, as the proxy served it: its value before the faults for BEFORE_STEPS, then
    growing from the first to the second sampling after them at the rate seen between the two (counters keep
    counting: dropped flushes, one a second); `up` as Prometheus saw it."""
    (t1, first), (t2, second) = scene.after
    per_step = STEP_SECONDS / (t2 - t1)
    before, labels = rule_series(scene.before), {"job": JOB, "instance": scene.proxy}
    found = []
    for key in sorted(set(rule_series(first)) | set(before)):
        name = key[0]
        start, end = first.get(key), second.get(key, first.get(key))
        if start is None or end is None:
            continue  # a series gone after the faults: not one the alerts need
        growth = (end - start) * per_step if name.endswith("_total") else 0.0
        # promtool: `a+bxn` is n+1 samples, `_xn` is n missing ones
        head = f"_x{BEFORE_STEPS}" if key not in before else f"{num(before[key])}+0x{BEFORE_STEPS - 1}"
        found.append({"series": series_name(name, {**dict(key[1]), **labels}),
                      "values": f"{head} {num(start)}+{num(growth)}x{AFTER_STEPS}"})
    for instance, up in scene.up.items():
        found.append({"series": series_name("up", {"job": JOB, "instance": instance}),
                      "values": f"{num(up)}+0x{BEFORE_STEPS + AFTER_STEPS}"})
    return found


def num(value: float) -> str:
    return f"{value:.12g}"


def expected(alert: str, labels: dict[str, str]) -> dict[str, Any]:
    """The alert as the shipped rule renders it for `labels` (its annotations use `$labels` only)."""
    rule = operational_alerts()[alert]
    full = {**labels, **rule["labels"]}
    annotations = {}
    for key, text in rule["annotations"].items():
        rendered = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: full[m.group(1)], text)
        assert "{{" not in rendered, (alert, key, text)
        annotations[key] = rendered
    return {"exp_labels": full, "exp_annotations": annotations}


def at(minutes: float) -> str:
    return f"{round(minutes * 60)}s"


def test_promtool_fires_the_alerts_past_their_for_on_the_process_series(scene: Scene, tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: run .ci/run, or apt-get install prometheus")
    proxy = {"job": JOB, "instance": scene.proxy}
    change = BEFORE_STEPS * STEP_SECONDS / 60  # minutes: the first "after" sample
    refused = [expected("SplitstreamRulesReloadRefused", {**proxy, "result": "error"})]
    no_backend = [expected("SplitstreamNoHealthyBackend", {**proxy, "pool": "dead"})]
    down = [expected("SplitstreamTargetDown", {"job": JOB, "instance": scene.dead_target})]
    store = [expected("SplitstreamStoreUnavailable", proxy)]
    cases = [
        (change - 0.25, "SplitstreamRulesReloadRefused", []),  # nothing refused before
        (change, "SplitstreamRulesReloadRefused", refused),  # at once: no `for:`
        (change + 14.75, "SplitstreamRulesReloadRefused", refused),  # held for the 15-minute window...
        (change + 15.25, "SplitstreamRulesReloadRefused", []),  # ...then resolved
        (change + 0.75, "SplitstreamStoreUnavailable", []),  # pending: `for: 1m` after a 1m rate window
        (change + 2.5, "SplitstreamStoreUnavailable", store),
        (change + 1.25, "SplitstreamNoHealthyBackend", no_backend),  # only the dead pool, never `live`
        (change + 1.25, "SplitstreamTargetDown", down),  # only the target where nothing listens
        (change + 20, "SplitstreamQueueSaturated", []),  # nothing queued, refused or rolled back
        (change + 20, "SplitstreamOverloaded", []),
        (change + 20, "SplitstreamRolloutRolledBack", []),
    ]
    if value(rule_series(scene.before), "splitstream_pool_healthy_backends", pool="dead") == 1:
        cases.append((change - 0.25, "SplitstreamNoHealthyBackend", []))  # sampled before its first failed probe
    tests = {
        "rule_files": [str(grafana.ALERTS)],
        "evaluation_interval": f"{STEP_SECONDS}s",
        "tests": [{
            "interval": f"{STEP_SECONDS}s",
            "input_series": input_series(scene),
            "alert_rule_test": [{"eval_time": at(minutes), "alertname": alert, "exp_alerts": alerts}
                                for minutes, alert, alerts in cases],
        }],
    }
    path = tmp_path / "tests.yml"
    path.write_text(json.dumps(tests, indent=1))  # JSON is YAML
    result = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
