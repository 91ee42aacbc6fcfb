"""`promtool` on dashboards/: the alert rule file, and the local demo's Prometheus configuration that loads it.

Needs the `promtool` binary (.ci/run installs it). The lint without binaries is tests/unit/test_dashboards.py;
that every query returns data is tests/integration/test_dashboards.py.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests import grafana


def test_alert_rules_are_valid_for_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: run .ci/run, or apt-get install prometheus")
    result = subprocess.run([promtool, "check", "rules", str(grafana.ALERTS)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_local_demo_prometheus_config_is_valid_and_loads_the_alerts() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: run .ci/run, or apt-get install prometheus")
    config = grafana.DASHBOARDS / "prometheus-demo.yml"
    result = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "alerts.yml" in result.stdout  # rule_files resolved next to the config, and checked too
