"""The command line as a shell uses it: separate `python -m proxy` processes, their exit codes, stdout and stderr.

Covers --version, options from the environment, exit codes (0 ok, 1 invalid rules or failure, 2 usage),
`check --skip-env`, the reserved backend name, `rollout` without rollouts / without a proxy / into a closed
pipe, and `demo --backend-ports`.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import openai
import pytest

from proxy import __version__
from proxy.cli import copy_moving_ports
from tests.conftest import simple_rules
from tests.processes import ROOT, free_port, reaped, start, wait_for_line

MESSAGES = [{"role": "user", "content": "hi"}]
BAD_RULES = "backends:\n  a: {url: 'ftp://x'}\nroutes: []\n"


async def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`python -m proxy ARGS` to its end: (exit code, stdout, stderr)."""
    proc = await start(*args, env=env)
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, stdout.decode(), stderr.decode()


def no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr


async def test_version() -> None:
    code, out, err = await run("--version")
    assert (code, out.strip(), err) == (0, f"splitstream {__version__}", "")


@pytest.mark.parametrize(("args", "env", "said"), [
    (["bogus"], {}, "invalid choice: 'bogus'"),
    (["serve", "--port", "http"], {}, "argument --port: 'http' is not a port number"),
    (["serve"], {"SPLITSTREAM_PORT": "http"}, "argument --port: $SPLITSTREAM_PORT='http' is not a port number"),
    (["serve"], {"SPLITSTREAM_LOG_PROBES": "maybe"}, "$SPLITSTREAM_LOG_PROBES='maybe' is not one of"),
    (["check"], {"SPLITSTREAM_LOG_LEVEL": "loud"}, "$SPLITSTREAM_LOG_LEVEL='loud' is not one of debug, info"),
    (["demo", "--backend-ports", "9101"], {}, "'9101' is not two different ports"),
    (["rollout", "pause"], {}, "which route?"),
])
async def test_usage_errors_exit_2_and_name_the_culprit(args: list[str], env: dict[str, str], said: str) -> None:
    code, out, err = await run(*args, env=env)
    assert code == 2 and said in err and out == ""
    no_traceback(err)


async def test_invalid_rules_exit_1(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(BAD_RULES)
    code, _, err = await run("serve", "--rules", str(tmp_path), "--port", str(free_port()))
    assert code == 1 and f"{tmp_path / 'bad.yaml'}:2:" in err
    code, _, err = await run("check", str(tmp_path))
    assert code == 1 and f"{tmp_path / 'bad.yaml'}:2:" in err


async def test_failure_at_run_time_exits_1(sim: Any, tmp_path: Path) -> None:
    """The port is taken: a failure at run time, not a usage error."""
    runtime, server = await sim()
    (tmp_path / "rules.yaml").write_text(simple_rules(server))
    code, _, err = await run("serve", "--rules", str(tmp_path), "--port", str(server.port))
    assert code == 1 and f"cannot listen on 127.0.0.1:{server.port}" in err
    no_traceback(err)


async def test_serve_takes_its_options_from_the_environment(sim: Any, tmp_path: Path) -> None:
    runtime, server = await sim()
    (tmp_path / "rules.yaml").write_text(simple_rules(server))
    port = free_port()
    env = {"SPLITSTREAM_RULES": str(tmp_path), "SPLITSTREAM_HOST": "127.0.0.1", "SPLITSTREAM_PORT": str(port),
           "SPLITSTREAM_NO_WATCH": "1", "SPLITSTREAM_LOG_LEVEL": "info"}
    async with reaped(await start("serve", env=env)) as proc:
        assert proc.stderr is not None
        line = await wait_for_line(proc.stderr, "listening")
        assert f"http://127.0.0.1:{port} (rules {tmp_path}," in line
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        await client.chat.completions.create(model="my-model", messages=MESSAGES, max_tokens=2)
        assert runtime.stats.requests == 1
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0


async def test_the_command_line_wins_over_the_environment(sim: Any, tmp_path: Path) -> None:
    """Port and log level from the command line (the level after the command), the variables say otherwise:
    at `warning` the `listening` line (info) would not be written."""
    runtime, server = await sim()
    (tmp_path / "rules.yaml").write_text(simple_rules(server))
    port = free_port()
    env = {"SPLITSTREAM_PORT": str(server.port), "SPLITSTREAM_LOG_LEVEL": "warning"}
    args = ("serve", "--rules", str(tmp_path), "--port", str(port), "--no-watch", "--log-level", "info")
    async with reaped(await start(*args, env=env)) as proc:
        assert proc.stderr is not None
        line = await wait_for_line(proc.stderr, "listening")
        assert f"http://127.0.0.1:{port} " in line
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0


async def test_check_skip_env_validates_rules_that_name_unset_variables(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(
        "backends:\n"
        "  a: {url: 'http://127.0.0.1:9', api_key_env: SPLITSTREAM_TEST_UNSET_KEY}\n"
        "pools: {p: {backends: [a]}}\n"
        "routes: [{name: r, match: {model: m}, pool: p}]\n")
    assert "SPLITSTREAM_TEST_UNSET_KEY" not in os.environ  # what the processes inherit
    code, _, err = await run("check", str(tmp_path))
    assert code == 1 and "api_key_env 'SPLITSTREAM_TEST_UNSET_KEY' is not set" in err
    code, out, err = await run("check", "--skip-env", str(tmp_path))
    assert code == 0, err
    assert out.strip() == f"{tmp_path}: ok (1 routes, 1 pools, 1 backends); environment variables were not checked " \
                          "(--skip-env)"


async def test_skip_env_still_reports_everything_else(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(BAD_RULES)
    code, out, err = await run("check", "--skip-env", str(tmp_path))
    assert code == 1 and "bad.yaml:2:" in err and "environment variables were not checked" in err


async def test_a_backend_may_not_be_named_cache(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(
        "backends:\n"
        "  ok: {url: 'http://127.0.0.1:9'}\n"
        "  cache: {url: 'http://127.0.0.1:10'}\n"
        "pools: {p: {backends: [ok, cache]}}\n"
        "routes: [{name: r, match: {model: m}, pool: p}]\n")
    code, _, err = await run("check", str(tmp_path))
    assert code == 1
    assert err.splitlines() == [
        f"{tmp_path / 'rules.yaml'}:3: backend 'cache': the name is reserved (it labels answers from the result "
        "cache in x-splitstream-backend and the metrics); rename the backend",
        f"{tmp_path}: 1 error(s)",
    ]


async def test_rollout_status_without_rollouts_says_so(served: Any, sim: Any) -> None:
    runtime, server = await sim()
    handle = await served(simple_rules(server))
    code, out, err = await run("rollout", "status", env={"SPLITSTREAM_URL": handle.url("")})
    assert code == 0, err
    assert out.startswith("no rollouts: no route of the rules at ")


async def test_rollout_names_the_url_it_could_not_reach() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = await run("rollout", "status", env={"SPLITSTREAM_URL": url})
    assert code == 1 and out == ""
    assert f"cannot reach splitstream at {url}" in err and "--url" in err and "$SPLITSTREAM_URL" in err
    no_traceback(err)


async def run_into_closed_pipe(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """`python -m proxy ARGS` whose stdout is a pipe nobody reads any more (`| head` after it exited):
    the read end is closed before the process starts, so its first write fails, every time."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", *args, cwd=ROOT, stdout=write_end, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )
    finally:
        os.close(write_end)
    _, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, stderr.decode()


async def test_a_reader_that_stops_early_ends_commands_quietly(served: Any, sim: Any) -> None:
    runtime, server = await sim()
    handle = await served(simple_rules(server))
    for args in (("rollout", "status", "--url", handle.url("")), ("check", "rules"), ("--help",)):
        code, err = await run_into_closed_pipe(*args)
        assert (code, err) == (0, ""), args


async def test_demo_moves_its_runtimes(tmp_path: Path) -> None:
    port, first, second = free_port(), free_port(), free_port()
    async with reaped(await start("demo", "--port", str(port), "--backend-ports", f"{first},{second}")) as proc:
        assert proc.stdout is not None
        await wait_for_line(proc.stdout, "base_url")
        line = await wait_for_line(proc.stdout, "simulated runtimes")
        assert f"127.0.0.1:{first} and :{second}" in line
        match = re.search(r"a copy of rules naming these ports in (\S+) ", line)
        assert match is not None, line
        copy = Path(match.group(1))
        assert f"http://127.0.0.1:{first}" in (copy / "demo.yaml").read_text()
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        chat = await client.chat.completions.create(model="llama-3.1-8b", messages=MESSAGES, max_tokens=3)
        assert chat.choices[0].message.content
        embedding = await client.embeddings.create(model="text-embedding-3-small", input="hello")
        assert embedding.data[0].embedding
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    assert not copy.exists()


def test_moving_ports_rewrites_loopback_urls_in_one_pass(tmp_path: Path) -> None:
    source, target = tmp_path / "rules", tmp_path / "copy"
    source.mkdir()
    target.mkdir()
    (source / "a.yaml").write_text("a: {url: 'http://127.0.0.1:9101'}\nb: {url: 'http://localhost:9102/v1'}\n"
                                   "c: {url: 'http://10.0.0.1:9101'}\nd: {url: 'http://127.0.0.1:91010'}\n")
    (source / "notes.txt").write_text("http://127.0.0.1:9101")
    copy_moving_ports(source, target, {9101: 9102, 9102: 9101})  # swapped: each URL moves once
    assert (target / "a.yaml").read_text() == (
        "a: {url: 'http://127.0.0.1:9102'}\nb: {url: 'http://localhost:9101/v1'}\n"
        "c: {url: 'http://10.0.0.1:9101'}\nd: {url: 'http://127.0.0.1:91010'}\n")
    assert [p.name for p in target.iterdir()] == ["a.yaml"]
