"""The operator-facing additions to the metric contract (`proxy/observe/metrics.py`): build_info, the standard
process series on each app's own registry, unit-named twins of deprecated names, healthy backends per pool,
and counters that exist before their first increment. Read through the exposition, as a scraper would."""

from __future__ import annotations

import importlib.metadata
import platform

import pytest
from prometheus_client.parser import text_string_to_metric_families

import proxy
from proxy.config.model import Backend, Pool, Snapshot
from proxy.observe.metrics import Metrics, build_version

PROCESS_SERIES = ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_start_time_seconds",
                  "process_open_fds")


def scrape(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, _ = metrics.exposition(None)
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode()) for sample in family.samples}


def names(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> set[str]:
    return {name for name, _ in samples}


def backend(name: str) -> Backend:
    return Backend(name, "http://127.0.0.1:1", "127.0.0.1", 1, "")


def test_build_info_names_the_version_and_python() -> None:
    samples = scrape(Metrics())
    labels = (("python", platform.python_version()), ("version", proxy.__version__))
    assert samples[("splitstream_build_info", labels)] == 1.0
    assert [name for name in names(samples) if name.startswith("splitstream_build_info")] == ["splitstream_build_info"]


def test_build_version_falls_back_to_the_installed_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(proxy, "__version__")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: f"{name}-from-metadata")
    assert build_version() == "splitstream-from-metadata"


@pytest.mark.skipif(platform.system() != "Linux", reason="process_* come from /proc")
def test_every_registry_serves_the_process_series() -> None:
    """Several apps live in one test process, each with its own registry: each serves them (no clash)."""
    first, second = scrape(Metrics()), scrape(Metrics())
    for samples in (first, second):
        assert set(PROCESS_SERIES) <= names(samples)
        assert "python_info" in names(samples)
    assert first[("process_start_time_seconds", ())] == second[("process_start_time_seconds", ())]


def test_predicted_load_is_served_in_seconds_and_under_its_old_name() -> None:
    metrics = Metrics()
    metrics.watch_backends(lambda: [("a", 2, 1.5, True), ("b", 0, 0.0, False)])
    samples = scrape(metrics)
    for name in ("splitstream_upstream_predicted_load_seconds", "splitstream_upstream_predicted_load"):
        assert samples[(name, (("backend", "a"),))] == 1.5
        assert samples[(name, (("backend", "b"),))] == 0.0


def test_rollout_step_ratio_is_the_step_as_a_fraction() -> None:
    metrics = Metrics()
    metrics.rollout_step.labels("chat").set(25)
    metrics.rollout_step.labels("embed").set(100)
    samples = scrape(metrics)
    assert samples[("splitstream_rollout_step_ratio", (("route", "chat"),))] == 0.25
    assert samples[("splitstream_rollout_step_ratio", (("route", "embed"),))] == 1.0
    metrics.rollout_step.remove("chat")  # the controller removes a route whose rollout left the rules
    assert ("splitstream_rollout_step_ratio", (("route", "chat"),)) not in scrape(metrics)


def test_pool_healthy_backends_counts_each_pool_from_the_running_rules() -> None:
    a, b, c = backend("a"), backend("b"), backend("c")
    pools = (Pool("both", (a, b), "m"), Pool("shared", (b, c), "m"), Pool("dead", (c,), "m"))
    snapshot = Snapshot(backends=(a, b, c), pools=pools, routes=())
    metrics = Metrics()
    assert "splitstream_pool_healthy_backends" not in names(scrape(metrics))  # no rules watched yet: no series
    metrics.watch_backends(lambda: [("a", 0, 0.0, True), ("b", 0, 0.0, True), ("c", 1, 0.3, False)])
    metrics.watch_rules(lambda: snapshot, dict)
    samples = scrape(metrics)
    healthy = {labels[0][1]: value for (name, labels), value in samples.items()
               if name == "splitstream_pool_healthy_backends"}
    assert healthy == {"both": 2.0, "shared": 1.0, "dead": 0.0}


def test_both_reload_results_exist_before_the_first_reload() -> None:
    """`increase()` cannot see a counter's first value: a refused reload must find the series at 0."""
    samples = scrape(Metrics())
    for result in ("success", "error"):
        assert samples[("splitstream_rules_reloads_total", (("result", result),))] == 0.0
