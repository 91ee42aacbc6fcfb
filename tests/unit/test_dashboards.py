"""Lint of dashboards/: Grafana JSON shape, the datasource variable everywhere, queries on contract metrics,
and the alert rules. `promtool` checks the rule file in tests/integration/test_dashboards_promtool.py; that the
queries return data is tests/integration/test_dashboards.py."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from tests import grafana

BOARDS = grafana.dashboards()


def walk(node: Any, key: str) -> list[Any]:
    """Every value stored under `key` anywhere in a JSON tree."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                found.append(v)
            found.extend(walk(v, key))
    elif isinstance(node, list):
        for item in node:
            found.extend(walk(item, key))
    return found


def test_the_split_and_backends_dashboards_exist() -> None:
    assert {"split", "backends"} <= set(BOARDS)


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_dashboard_is_grafana_json_with_unique_panel_ids(name: str) -> None:
    board = BOARDS[name]
    assert board["schemaVersion"] >= 36
    assert board["uid"] and board["title"] and board["panels"]
    ids = Counter(panel["id"] for panel in board["panels"])
    assert [i for i, n in ids.items() if n > 1] == []
    assert all(panel["type"] != "row" for panel in board["panels"]), "rows carry no queries: keep panels flat"


def test_dashboard_uids_are_unique() -> None:
    assert len({board["uid"] for board in BOARDS.values()}) == len(BOARDS)


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_every_panel_and_target_uses_the_datasource_variable(name: str) -> None:
    board = BOARDS[name]
    [datasource] = [v for v in grafana.variables(board) if v["name"] == "datasource"]
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"
    for panel in board["panels"]:
        assert panel["datasource"] == grafana.DATASOURCE, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        refs = [target["refId"] for target in panel["targets"]]
        assert len(set(refs)) == len(refs), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == grafana.DATASOURCE, (panel["title"], target["refId"])
            assert target["expr"].strip(), (panel["title"], target["refId"])
    # no data source named anywhere else either (query variables included)
    assert all(ds == grafana.DATASOURCE for ds in walk(board, "datasource"))


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_every_variable_used_is_defined(name: str) -> None:
    board = BOARDS[name]
    defined = {v["name"] for v in grafana.variables(board)} | set(grafana.BUILTIN_VARIABLES)
    used = {m for q in grafana.panel_queries() if q.dashboard == name for m in grafana.VARIABLE.findall(q.expr)}
    used |= {m for v in grafana.variables(board) if v["type"] == "query"
             for m in grafana.VARIABLE.findall(grafana.variable_query(v))}
    assert used <= defined, used - defined


def test_split_dashboard_selects_route_and_variant_from_label_values() -> None:
    by_name = {v["name"]: v for v in grafana.variables(BOARDS["split"])}
    for name in ("route", "variant"):
        assert by_name[name]["type"] == "query"
        assert grafana.variable_query(by_name[name]).startswith("label_values(splitstream_")
        assert by_name[name]["datasource"] == grafana.DATASOURCE
    assert "$route" in grafana.variable_query(by_name["variant"])  # variants of the selected routes only


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_panels_do_not_overlap(name: str) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in BOARDS[name]["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_queries_and_rules_use_contract_metrics_only() -> None:
    contract = grafana.metric_contract()
    expressions = [q.expr for q in grafana.panel_queries()]
    expressions += [grafana.variable_query(v) for board in BOARDS.values() for v in grafana.variables(board)
                    if v["type"] == "query"]
    expressions += [rule["expr"] for rule in grafana.rules()]
    used = set().union(*(grafana.metrics_in(expr, contract) for expr in expressions))
    assert used and used <= set(contract), used - set(contract)


def test_the_contract_table_lists_the_design_contract() -> None:
    contract = grafana.metric_contract()
    design = {  # shared/DESIGN.md "Metric contract": these names and labels are what everything depends on
        "requests_total": ("route", "variant", "backend", "status"),
        "request_duration_seconds": ("route", "variant", "backend"),
        "time_to_first_token_seconds": ("route", "variant", "backend"),
        "tokens_total": ("route", "variant", "backend", "kind"),
        "upstream_inflight": ("backend",),
        "upstream_predicted_load": ("backend",),
        "upstream_healthy": ("backend",),
        "upstream_errors_total": ("backend", "reason"),
        "split_assignments_total": ("route", "variant", "source"),
        "shadow_requests_total": ("route", "pool", "outcome"),
        "shadow_duration_seconds": ("route", "pool"),
        "cache_requests_total": ("route", "result"),
        "rules_reloads_total": ("result",),
        "rules_generation": (),
    }
    for name, labels in design.items():
        assert contract[f"splitstream_{name}"].labels == labels, name
    assert contract["splitstream_requests_total"].closed["status"] == {"2xx", "4xx", "5xx"}
    assert contract["splitstream_cache_requests_total"].closed["result"] == {"hit", "miss", "bypass", "coalesced"}


def test_alerts_compare_variants_and_say_what_to_do() -> None:
    alerts = {rule["alert"]: rule for rule in grafana.rules() if "alert" in rule}
    assert set(alerts) == {"SplitstreamCanaryErrorRate", "SplitstreamCanaryLatencyP95"}
    for rule in alerts.values():
        assert "variant" in rule["expr"] and "on (route)" in rule["expr"]
        assert rule["labels"]["severity"] and rule["for"]
        assert "{{ $labels.variant }}" in rule["annotations"]["summary"]
        assert rule["annotations"]["description"]
