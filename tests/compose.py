"""The compose demo (compose/docker-compose.yml and the files it mounts), read for the tests.

`tests/unit/test_compose.py` checks it without a container engine; `tests/integration/test_compose_promtool.py`
has `promtool` check its Prometheus configuration.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from proxy.cli import _parser

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_DIR = ROOT / "compose"
COMPOSE = yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]


def command(service: str) -> argparse.Namespace:
    return _parser().parse_args(SERVICES[service]["command"])


def of_kind(kind: str) -> list[str]:
    """Services running our image with `splitstream <kind>`."""
    return sorted(name for name, s in SERVICES.items() if "build" in s and s["command"][0] == kind)


def mounts(service: str) -> dict[str, Path]:
    """Container path -> repository path of the service's bind mounts."""
    found = {}
    for volume in SERVICES[service].get("volumes", []):
        source, target = volume.split(":")[:2]
        assert source.startswith("."), f"{service}: {volume} is not a file of the repository"
        found[target] = (COMPOSE_DIR / source).resolve()
    return found


def mounted(service: str, container_path: str) -> Path:
    """The repository file behind a path inside the container (through a mounted file or directory)."""
    for target, source in mounts(service).items():
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return source / Path(container_path).relative_to(target)
    raise AssertionError(f"{service}: nothing mounted at {container_path}")


def published(service: str) -> set[int]:
    """Host ports of `ports:` entries ([ip:]host:container)."""
    ports = set()
    for entry in SERVICES[service].get("ports", []):
        parts = str(entry).split(":")
        ports.add(int(parts[-2] if len(parts) > 1 else parts[0]))
    return ports
