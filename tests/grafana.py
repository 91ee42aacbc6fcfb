"""The shipped dashboards, alert rules and metric contract, read for the tests (no assertions here).

`tests/unit/test_dashboards.py` lints them; `tests/integration/test_dashboards_promtool.py` runs `promtool`
on the rules; `tests/integration/test_dashboards.py` runs every query against a real Prometheus. The
contract is the table in dashboards/README.md, so the documentation cannot drift.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "dashboards"
ALERTS = DASHBOARDS / "alerts.yml"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Grafana's own variables and what the tests put in their place (Prometheus scrapes every second there).
BUILTIN_VARIABLES = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m"}
# A metric name, not part of a recording rule name such as `route_variant:splitstream_requests:rate5m`.
METRIC_NAME = re.compile(r"(?<![\w:])splitstream_[a-z0-9_]+(?![\w:])")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
VARIABLE = re.compile(r"\$\{?(\w+)\}?")


@dataclass(frozen=True, slots=True)
class Query:
    dashboard: str
    panel_id: int
    panel: str
    ref_id: str
    expr: str

    @property
    def name(self) -> str:
        return f"{self.dashboard}:{self.panel_id}{self.ref_id}:{self.panel}"


@dataclass(frozen=True, slots=True)
class ContractMetric:
    name: str
    type: str  # counter | gauge | histogram
    labels: tuple[str, ...]
    closed: dict[str, frozenset[str]]  # label -> allowed values, for the labels that are closed sets


def dashboards() -> dict[str, dict[str, Any]]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def panel_queries() -> list[Query]:
    return [
        Query(name, panel["id"], panel["title"], target["refId"], target["expr"])
        for name, board in dashboards().items()
        for panel in board["panels"]
        for target in panel.get("targets", [])
    ]


def variables(board: dict[str, Any]) -> list[dict[str, Any]]:
    return list(board.get("templating", {}).get("list", []))


def variable_query(variable: dict[str, Any]) -> str:
    query = variable["query"]
    return str(query["query"] if isinstance(query, dict) else query)


def rule_groups() -> list[dict[str, Any]]:
    return list(yaml.safe_load(ALERTS.read_text())["groups"])


def rules() -> list[dict[str, Any]]:
    return [rule for group in rule_groups() for rule in group["rules"]]


def metric_contract() -> dict[str, ContractMetric]:
    """The table under '## Metric contract' in dashboards/README.md."""
    text = (DASHBOARDS / "README.md").read_text().split("## Metric contract", 1)[1]
    contract = {}
    for line in text.splitlines():
        match = re.fullmatch(r"\| `(splitstream_\w+)` \| (\w+) \| (.*) \|", line.strip())
        if match is None:
            continue
        name, kind, label_text = match.groups()
        labels: list[str] = []
        closed: dict[str, frozenset[str]] = {}
        for label, values in re.findall(r"(\w+)(?: \(([^)]*)\))?", label_text.replace("—", "")):
            labels.append(label)
            if values:
                closed[label] = frozenset(v.strip() for v in values.split(","))
        contract[name] = ContractMetric(name, kind, tuple(labels), closed)
    return contract


def family_name(series: str, contract: dict[str, ContractMetric]) -> str:
    """The contract name a series belongs to (`x_bucket` → `x` for histograms)."""
    for suffix in HISTOGRAM_SUFFIXES:
        base = series.removesuffix(suffix)
        if base != series and contract.get(base) is not None and contract[base].type == "histogram":
            return base
    return series


def metrics_in(expr: str, contract: dict[str, ContractMetric]) -> set[str]:
    return {family_name(name, contract) for name in METRIC_NAME.findall(expr)}


def substitute(expr: str, values: dict[str, str]) -> str:
    """`expr` with `$name` / `${name}` replaced, as Grafana would before sending it."""
    return VARIABLE.sub(lambda m: values[m.group(1)], expr)
