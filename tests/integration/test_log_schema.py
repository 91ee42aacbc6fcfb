"""The log a pipeline reads: every stderr line of a real `python -m proxy serve` is JSON and follows the README's
"Logs" table (keys, types, which lines carry them); probes and scrapes are logged only when asked."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import simple_rules
from tests.processes import ROOT, free_port, reaped, start

MESSAGES = [{"role": "user", "content": "hi"}]
TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
PROBES = {"/healthz", "/readyz", "/metrics"}
JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "null": (type(None),),
}


def documented_keys() -> dict[str, tuple[str, str]]:
    """key -> (type, lines) from the README's "Logs" table."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Logs\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| ([^|]+) \| ([^|]+) \|", section, re.MULTILINE)
    assert rows, "no table in the README's Logs section"
    return {key: (kind.strip(), lines.strip()) for key, kind, lines in rows}


def conforms(value: object, kind: str) -> bool:
    allowed = tuple(t for name in kind.split(" or ") for t in JSON_TYPES[name])
    if isinstance(value, bool) and bool not in allowed:
        return False  # JSON true is no integer
    return isinstance(value, allowed)


async def logged_lines(sim: Any, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Every stderr line of a serve that answered a success, a stream, an unknown model, an unknown URL and
    the three probe paths, parsed as JSON (a line that is not JSON fails here)."""
    runtime, server = await sim()
    (tmp_path / "rules.yaml").write_text(simple_rules(server))
    port = free_port()
    before = time.time()
    lines: list[str] = []
    async with reaped(await start("serve", "--rules", str(tmp_path), "--port", str(port), "--no-watch", *args,
                                  env=env)) as proc:
        assert proc.stderr is not None
        while "listening" not in (lines[-1] if lines else ""):
            line = (await asyncio.wait_for(proc.stderr.readline(), 60)).decode()
            assert line, "".join(lines)
            lines.append(line)
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        await client.chat.completions.create(model="my-model", messages=MESSAGES, max_tokens=2)
        stream = await client.chat.completions.create(model="my-model", messages=MESSAGES, max_tokens=2, stream=True)
        [chunk async for chunk in stream]
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="no-such-model", messages=MESSAGES)
        async with aiohttp.ClientSession() as session:
            for path in (*sorted(PROBES), "/no/such/path"):
                async with session.get(f"http://127.0.0.1:{port}{path}") as response:
                    await response.read()
        proc.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(proc.stderr.read(), 60)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    after = time.time()
    entries = [json.loads(line) for line in [*lines, *rest.decode().splitlines()] if line.strip()]
    for entry in entries:
        when = datetime.fromisoformat(entry["ts"].replace("Z", "+00:00")).timestamp()
        assert TS.fullmatch(entry["ts"]) and int(before * 1000) / 1000 <= when <= after, entry
    return entries


async def test_every_line_follows_the_documented_schema(sim: Any, tmp_path: Path) -> None:
    entries = await logged_lines(sim, tmp_path)
    schema = documented_keys()
    access_keys = {key for key, (_, lines) in schema.items() if lines in ("all", "access")}
    operational_keys = {key for key, (_, lines) in schema.items() if lines.split(",")[0] in ("all", "operational")}
    required_operational = {key for key, (_, lines) in schema.items() if lines in ("all", "operational")}
    access = [entry for entry in entries if entry["msg"] == "request"]
    others = [entry for entry in entries if entry["msg"] != "request"]
    for entry in access:
        assert set(entry) == access_keys, entry
        for key, value in entry.items():
            assert conforms(value, schema[key][0]), (key, value, schema[key][0])
        assert entry["level"] == "info" and entry["client"] == "127.0.0.1" and entry["tenant"] is None
    for entry in others:
        assert required_operational <= set(entry) <= operational_keys, entry
        assert conforms(entry["level"], "string") and conforms(entry["logger"], "string")
    assert any("listening" in entry["msg"] for entry in others)

    by_path: dict[str, list[dict[str, Any]]] = {}
    for entry in access:
        by_path.setdefault(entry["path"], []).append(entry)
    assert set(by_path) == {"/v1/chat/completions", "/no/such/path"}  # no probe or scrape lines
    answered, streamed, unknown = by_path["/v1/chat/completions"]
    assert (answered["status"], answered["route"], answered["backend"]) == (200, "main", "b0")
    assert answered["stream"] is False
    assert streamed["stream"] is True and streamed["ttft_ms"] is not None
    assert (unknown["status"], unknown["error"]) == (404, "model_not_found")
    assert unknown["route"] is unknown["variant"] is unknown["backend"] is None
    [lost] = by_path["/no/such/path"]
    assert lost["status"] == 404 and lost["route"] is None


@pytest.mark.parametrize(("args", "env"), [(("--log-probes",), {}), ((), {"SPLITSTREAM_LOG_PROBES": "1"})],
                         ids=["option", "environment"])
async def test_probes_are_logged_when_asked(sim: Any, tmp_path: Path, args: tuple[str, ...],
                                            env: dict[str, str]) -> None:
    entries = await logged_lines(sim, tmp_path, *args, env=env)
    assert {entry["path"] for entry in entries if entry["msg"] == "request"} == {*PROBES, "/v1/chat/completions",
                                                                                  "/no/such/path"}
