"""`splitstream rollout status|pause|resume|promote|abort [ROUTE]`: the operators' client of /admin/rollouts.

Blocking HTTP (urllib) against a running proxy's admin API, so it needs no event loop; prints one summary
line per rollout and its recent decisions (names and numbers), or the raw JSON with `--json`. Exit codes
are the CLI's: 0 done, 1 refused by the proxy (its OpenAI-shaped error is printed) or proxy unreachable
(the URL tried and how to change it are printed), 2 usage. Called by `cli.py`. Every request carries
`X-Splitstream-Admin: 1`, which the admin guard wants on POSTs (no plain form sends it).
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, TextIO

from proxy.auth import ADMIN_MARKER

DEFAULT_URL = "http://127.0.0.1:8080"
URL_ENV = "SPLITSTREAM_URL"  # the proxy's URL when `--url` is not given (the CLI reads it)
TIMEOUT = 10.0
DECISIONS_SHOWN = 5
HEADERS = {"Accept": "application/json", ADMIN_MARKER: "1"}


def run(action: str, route: str | None, url: str = DEFAULT_URL, token: str | None = None, as_json: bool = False,
        out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """One command; `token` defaults to SPLITSTREAM_ADMIN_TOKEN (none: the proxy must be on loopback)."""
    token = token if token is not None else os.environ.get("SPLITSTREAM_ADMIN_TOKEN", "")
    base = url.rstrip("/") + "/admin/rollouts"
    if action == "status":
        path = base if route is None else f"{base}/{urllib.parse.quote(route, safe='')}"
        method = "GET"
    elif route is None:
        print(f"splitstream rollout {action}: which route?", file=err)
        return 2
    else:
        path, method = f"{base}/{urllib.parse.quote(route, safe='')}/{action}", "POST"
    request = urllib.request.Request(path, method=method, headers=HEADERS)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            document = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        print(f"{exc.code}: {_error_message(exc.read())}", file=err)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"cannot reach splitstream at {url}: {getattr(exc, 'reason', exc)}\n"
              f"  (give the proxy's URL with --url or ${URL_ENV})", file=err)
        return 1
    if as_json:
        print(json.dumps(document, indent=2), file=out)
        return 0
    rollouts = document.get("rollouts", [document])
    if not rollouts:
        print(f"no rollouts: no route of the rules at {url} has a `rollout:` block", file=out)
    for rollout in rollouts:
        print(summary(rollout), file=out)
        for decision in rollout["history"][-DECISIONS_SHOWN:]:
            print("  " + decision_line(decision), file=out)
    return 0


def summary(rollout: dict[str, Any]) -> str:
    step = rollout["step"]
    where = f"step {step + 1}/{len(rollout['steps'])}" if step is not None else "not started"
    return (f"{rollout['route']}: {rollout['status']}, candidate {rollout['candidate']} at {rollout['percent']:g}% "
            f"({where}, steps {' '.join(f'{s:g}' for s in rollout['steps'])}), baseline {rollout['baseline']}"
            + (f", next analysis {rollout['due']}" if rollout["due"] else "")
            + (f"; the last step passed: `splitstream rollout promote {rollout['route']}` promotes it"
               if rollout["status"] == "awaiting_promotion" else ""))


def decision_line(decision: dict[str, Any]) -> str:
    numbers = decision.get("numbers") or {}
    shown = " ".join(f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}"
                     for name, value in numbers.items() if value is not None and name != "alpha")
    return f"{decision['at']} {decision['action']} -> {decision['percent']:g}% ({decision['reason']}) {shown}".rstrip()


def _error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace")[:200]
