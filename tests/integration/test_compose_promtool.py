"""`promtool check config` on the compose demo's Prometheus configuration, with the alert rules it mounts.

Needs the `promtool` binary (.ci/run installs it). The rest of the compose demo is checked without any binary
in tests/unit/test_compose.py.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests import grafana
from tests.compose import command, mounted, of_kind


def test_prometheus_scrapes_both_replicas_with_the_alert_rules(tmp_path: Path) -> None:
    config = yaml.safe_load(mounted("prometheus", "/etc/prometheus/prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {f"{name}:{command(name).port}" for name in of_kind("serve")}
    rule_files = [mounted("prometheus", path) for path in config["rule_files"]]
    assert rule_files == [grafana.ALERTS]
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: run .ci/run, or apt-get install prometheus")
    config["rule_files"] = [str(path) for path in rule_files]  # the container paths, as seen from here
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
