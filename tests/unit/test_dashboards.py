"""Lint of dashboards/: Grafana JSON shape, the datasource variable everywhere, queries on contract metrics,
and the alert rules. `promtool` checks the rule file in tests/integration/test_dashboards_promtool.py; that the
queries return data is tests/integration/test_dashboards.py."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import pytest

from tests import grafana

BOARDS = grafana.dashboards()
README = (grafana.DASHBOARDS / "README.md").read_text()
ROLLOUT_ALERTS = {"SplitstreamCanaryErrorRate", "SplitstreamCanaryLatencyP95"}
OPERATIONS_ALERTS = {"SplitstreamTargetDown", "SplitstreamNoHealthyBackend", "SplitstreamRulesReloadRefused",
                     "SplitstreamQueueSaturated", "SplitstreamOverloaded", "SplitstreamRolloutRolledBack",
                     "SplitstreamStoreUnavailable"}
# A series selector of a splitstream or process metric, with its matchers if it has any.
SELECTOR = re.compile(r"(?<![\w:])((?:splitstream|process)_[a-z0-9_]+)(?![\w:])(\{[^}]*\})?")
SCOPE = {"job": 'job=~"$job"', "instance": 'instance=~"$instance"'}


def board_annotations(board: dict[str, Any]) -> list[dict[str, Any]]:
    return list(board.get("annotations", {}).get("list", []))


def board_expressions(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(what, expression) of every panel target, query variable and annotation of a dashboard."""
    found = [(f"panel {panel['title']!r} {target['refId']}", target["expr"])
             for panel in board["panels"] for target in panel["targets"]]
    found += [(f"variable {v['name']}", grafana.variable_query(v)) for v in grafana.variables(board)
              if v["type"] == "query"]
    found += [(f"annotation {a['name']!r}", a["expr"]) for a in board_annotations(board)]
    return found


def anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def readme_sections() -> dict[str, str]:
    """Anchor -> body of every `##`/`###` section of dashboards/README.md."""
    parts = re.split(r"^#{2,3} (.+)$", README, flags=re.MULTILINE)
    return {anchor(title): body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def deprecated_names() -> dict[str, str]:
    """The README's deprecated metric names and their successors."""
    section = README.split("### Deprecated names", 1)[1]
    return dict(re.findall(r"^\| `(splitstream_\w+)` \| `(splitstream_\w+)` \|", section, flags=re.MULTILINE))


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
    used = {m for _, expr in board_expressions(board) for m in grafana.VARIABLE.findall(expr)}
    assert used <= defined, used - defined


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_job_and_instance_variables_scope_every_query(name: str) -> None:
    """One Prometheus may scrape several fleets: every selector of every panel, variable and annotation
    keeps to the selected jobs and instances (the job variable lists them all; instance, the jobs')."""
    board = BOARDS[name]
    by_name = {v["name"]: v for v in grafana.variables(board)}
    assert grafana.variable_query(by_name["job"]) == "label_values(splitstream_build_info, job)"
    assert grafana.variable_query(by_name["instance"]) == 'label_values(splitstream_build_info{job=~"$job"}, instance)'
    for key in ("job", "instance"):
        assert by_name[key]["multi"] and by_name[key]["includeAll"]
        assert by_name[key]["datasource"] == grafana.DATASOURCE
    names = [v["name"] for v in grafana.variables(board)]
    assert names.index("job") < names.index("instance") < min(
        names.index(v) for v in by_name if v not in ("datasource", "job", "instance"))  # scoped ones come after
    for what, expr in board_expressions(board):
        selectors = SELECTOR.findall(expr)
        assert selectors, what
        exempt = {"variable job": set(SCOPE), "variable instance": {"instance"}}.get(what, set())
        for metric, matchers in selectors:
            for key, matcher in SCOPE.items():
                assert key in exempt or matcher in matchers, f"{what}: {metric}{matchers} lacks {matcher}"


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_annotations_mark_rule_reloads_and_rollout_transitions(name: str) -> None:
    found = {a["name"]: a for a in board_annotations(BOARDS[name])}
    assert set(found) == {"Rule reloads", "Refused rule reloads", "Rollout transitions"}
    assert "splitstream_rules_generation" in found["Rule reloads"]["expr"]
    assert 'splitstream_rules_reloads_total{' in found["Refused rule reloads"]["expr"]
    assert 'result="error"' in found["Refused rule reloads"]["expr"]
    assert "splitstream_rollout_transitions_total" in found["Rollout transitions"]["expr"]
    for annotation in found.values():
        assert annotation["datasource"] == grafana.DATASOURCE and annotation["enable"]
        assert annotation["titleFormat"] and annotation["iconColor"]


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


def alerts_of(group: str) -> dict[str, dict[str, Any]]:
    [rules] = [g["rules"] for g in grafana.rule_groups() if g["name"] == group]
    return {rule["alert"]: rule for rule in rules if "alert" in rule}


def test_alerts_compare_variants_and_say_what_to_do() -> None:
    alerts = alerts_of("splitstream-rollout")
    assert set(alerts) == ROLLOUT_ALERTS
    for rule in alerts.values():
        assert "variant" in rule["expr"] and "on (route)" in rule["expr"]
        assert rule["labels"]["severity"] and rule["for"]
        assert "{{ $labels.variant }}" in rule["annotations"]["summary"]
        assert rule["annotations"]["description"]


def test_operational_alerts_name_the_replica_and_say_what_happened() -> None:
    alerts = alerts_of("splitstream-operations")
    assert set(alerts) == OPERATIONS_ALERTS
    assert {g["name"] for g in grafana.rule_groups()} == {"splitstream-rollout", "splitstream-operations"}
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert "{{ $labels.instance }}" in rule["annotations"]["summary"] + rule["annotations"]["description"], name
    assert alerts["SplitstreamNoHealthyBackend"]["for"] == "1m"  # the "for 1 m"
    assert "splitstream_pool_healthy_backends" in alerts["SplitstreamNoHealthyBackend"]["expr"]
    assert alerts["SplitstreamTargetDown"]["expr"].startswith("up{")


@pytest.mark.parametrize("rule", [r for r in grafana.rules() if "alert" in r], ids=lambda r: r["alert"])
def test_every_alert_links_its_runbook(rule: dict[str, Any]) -> None:
    """runbook_url: a section of dashboards/README.md named after the alert, that says what to check and do."""
    url = rule["annotations"]["runbook_url"]
    assert url == f"dashboards/README.md#{anchor(rule['alert'])}"
    body = readme_sections().get(url.split("#", 1)[1])
    assert body is not None, f"no section {url} in dashboards/README.md"
    assert "**Check**" in body and "**Do**" in body, rule["alert"]


def test_deprecated_names_have_unit_named_successors_that_everything_uses() -> None:
    contract = grafana.metric_contract()
    deprecated = deprecated_names()
    assert deprecated == {"splitstream_upstream_predicted_load": "splitstream_upstream_predicted_load_seconds",
                          "splitstream_rollout_step": "splitstream_rollout_step_ratio"}
    for old, new in deprecated.items():
        assert contract[old].labels == contract[new].labels and contract[old].type == contract[new].type
    expressions = [expr for board in BOARDS.values() for _, expr in board_expressions(board)]
    expressions += [rule["expr"] for rule in grafana.rules()]
    used = set().union(*(grafana.metrics_in(expr, contract) for expr in expressions))
    assert not used & set(deprecated), used & set(deprecated)
    assert {"splitstream_upstream_predicted_load_seconds", "splitstream_rollout_step_ratio",
            "splitstream_pool_healthy_backends", "splitstream_build_info"} <= used
