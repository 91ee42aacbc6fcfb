"""What a results file says about its run, and writing it: machine, commit, load average, JSON without NaN.

Used by every benchmark in bench/ at the end of a run (bench/results/<name>-<UTC start>.json); it measures
nothing and starts no process except `wrk -v`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from harness import ROOT

RESULTS = ROOT / "bench" / "results"


def git_commit() -> str | None:
    """Short HEAD commit, read from .git directly (no git process needed)."""
    git = ROOT / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:7]
        ref = head[5:]
        path = git / ref
        if path.exists():
            return path.read_text().strip()[:7]
        packed = git / "packed-refs"
        if packed.exists():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0][:7]
    except OSError:
        pass
    return None


def loadavg() -> list[str]:
    """The 1, 5 and 15 minute load averages, as /proc/loadavg writes them."""
    return Path("/proc/loadavg").read_text().split()[:3]


def machine_info(client: str) -> dict[str, Any]:
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    wrk_version = None
    if shutil.which("wrk"):
        out = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
        wrk_version = (out.stdout or out.stderr).splitlines()[0].strip() if (out.stdout or out.stderr) else None
    versions = {}
    for mod in ("aiohttp", "uvloop", "httptools", "orjson"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - informational only
            versions[mod] = None
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "wrk": wrk_version,
        "load_client": client,
        "git_commit": git_commit(),
        "packages": versions,
        "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }


def no_nan(v: Any) -> Any:
    """NaN is not JSON: write null instead."""
    if isinstance(v, float) and v != v:
        return None
    if isinstance(v, dict):
        return {k: no_nan(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [no_nan(x) for x in v]
    return v


def write_results(benchmark: str, started: dt.datetime, wall_s: float, complete: bool,
                  fields: dict[str, Any]) -> Path:
    """Write bench/results/<benchmark>-<UTC start>.json (the common header, then `fields`; NaN as null), say where."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{benchmark}-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    doc = {"benchmark": benchmark, "started_utc": started.isoformat(timespec="seconds"),
           "wall_time_s": round(wall_s, 1), "complete": complete, **fields}
    out.write_text(json.dumps(no_nan(doc), indent=2, default=str) + "\n")
    print(f"results written to {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return out
