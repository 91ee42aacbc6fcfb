"""The compose demo and the Dockerfile, checked without a container engine (none runs in CI).

Every bind-mounted file exists in the repository, every command parses with the real CLI, the mounted rules
pass `splitstream check` and point at the simulated runtimes' services and ports, nginx, Prometheus and
Grafana point at the services that exist. That `promtool` accepts the Prometheus configuration is
tests/integration/test_compose_promtool.py (it needs the binary).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest
import yaml

from proxy.cli import check
from proxy.config.loader import load_rules
from tests import grafana
from tests.compose import COMPOSE_DIR, ROOT, SERVICES, command, mounted, mounts, of_kind, published


def test_the_stack_has_every_part() -> None:
    assert {"lb", "redis", "prometheus", "grafana", "loadgen"} <= set(SERVICES)
    assert len(of_kind("serve")) >= 2 and len(of_kind("sim-backend")) >= 2
    for name, service in SERVICES.items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            context = (COMPOSE_DIR / service["build"]["context"]).resolve()
            assert context == ROOT and (context / service["build"]["dockerfile"]).is_file(), name
        depends = service.get("depends_on", [])
        assert set(depends) <= set(SERVICES), (name, depends)


def test_every_mounted_file_is_in_the_repository() -> None:
    for name in SERVICES:
        for target, source in mounts(name).items():
            assert source.exists() and ROOT in source.parents, (name, target, source)


def test_one_port_for_clients_and_the_replicas_behind_it() -> None:
    assert published("lb") == {8080}
    assert published("prometheus") == {9090} and published("grafana") == {3000}
    assert all(not published(name) for name in SERVICES if name not in {"lb", "prometheus", "grafana"})
    nginx = mounted("lb", "/etc/nginx/nginx.conf").read_text()
    assert re.search(r"listen\s+8080;", nginx) and re.search(r"proxy_buffering\s+off;", nginx)
    upstream = set(re.findall(r"^\s*server\s+([\w.-]+:\d+)", nginx, re.MULTILINE))
    assert upstream == {f"{name}:{command(name).port}" for name in of_kind("serve")}


def test_replicas_share_redis_and_serve_rules_that_pass_check(capsys: pytest.CaptureFixture[str]) -> None:
    for name in of_kind("serve"):
        args = command(name)
        assert args.host == "0.0.0.0"
        assert urlsplit(args.redis).hostname == "redis" and "redis" in SERVICES
        rules = mounted(name, args.rules)
        assert check(str(rules)) == 0, capsys.readouterr().err


def test_rules_point_at_the_simulated_runtimes() -> None:
    [name, *_] = of_kind("serve")
    snapshot = load_rules(mounted(name, command(name).rules))
    sims = {sim: command(sim) for sim in of_kind("sim-backend")}
    for backend in snapshot.backends:
        assert backend.host in sims, f"backend {backend.name}: no service {backend.host}"
        sim = sims[backend.host]
        assert sim.host == "0.0.0.0" and sim.port == backend.port, backend.name
    for pool in snapshot.pools:
        for backend in pool.backends:
            assert pool.model in sims[backend.host].model.split(","), (pool.name, backend.name)
    routes = {route.name: route for route in snapshot.routes}
    assert any(len(r.variants) > 1 for r in routes.values()) and any(r.shadows for r in routes.values())
    assert any(r.cache is not None for r in routes.values())  # every panel of the split dashboard has data


def test_loadgen_sends_to_the_balancer() -> None:
    args = command("loadgen")
    assert [urlsplit(url).hostname for url in args.url] == ["lb"]
    assert urlsplit(args.url[0]).port == 8080


def test_grafana_is_provisioned_with_prometheus_and_the_dashboards() -> None:
    provisioning = mounted("grafana", "/etc/grafana/provisioning")
    [datasource] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["isDefault"]
    assert urlsplit(datasource["url"]).hostname == "prometheus"
    assert urlsplit(datasource["url"]).port == 9090  # Prometheus's default listen port (no flag in its command)
    assert not any(arg.startswith("--web.listen-address") for arg in SERVICES["prometheus"]["command"])
    [provider] = yaml.safe_load((provisioning / "dashboards" / "splitstream.yml").read_text())["providers"]
    assert mounted("grafana", provider["options"]["path"]) == grafana.DASHBOARDS
    home = SERVICES["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert mounted("grafana", home).is_file()


def test_dockerfile_is_slim_non_root_and_checks_healthz() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:[\d.]+-slim", dockerfile, re.MULTILINE)
    user = re.findall(r"^USER\s+(\S+)", dockerfile, re.MULTILINE)
    assert user and user[-1] not in {"root", "0"}
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", dockerfile, re.MULTILINE)
    assert re.search(r"^RUN pip install \.", dockerfile, re.MULTILINE)
    assert re.search(r'^ENTRYPOINT \["splitstream"\]', dockerfile, re.MULTILINE)
