"""splitstream as operators run it: separate processes, signals, the CLI and the demo."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from proxy.cli import check
from tests.conftest import Gate, simple_rules
from tests.processes import ROOT, free_port, reaped, start, wait_for_line

MESSAGES = [{"role": "user", "content": "hi"}]


async def test_sigterm_drains_streams_in_flight(sim: Any, tmp_path: Path) -> None:
    gate = Gate()
    runtime, server = await sim(pacer=gate)
    (tmp_path / "rules.yaml").write_text(simple_rules(server))
    port = free_port()
    async with reaped(await start("serve", "--rules", str(tmp_path), "--port", str(port))) as proc:
        assert proc.stderr is not None
        await wait_for_line(proc.stderr, "listening")
        gate.open(0)
        async with aiohttp.ClientSession() as session:
            body = {"model": "my-model", "messages": MESSAGES, "stream": True, "max_tokens": 4}
            async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as response:
                first = await response.content.readuntil(b"\n\n")
                assert first.startswith(b"data: ")
                proc.send_signal(signal.SIGTERM)
                await wait_for_line(proc.stderr, "draining")
                with pytest.raises(aiohttp.ClientConnectionError):
                    async with aiohttp.ClientSession() as other:
                        await other.get(f"http://127.0.0.1:{port}/healthz")
                gate.open_all()
                rest = await response.read()
        assert rest.rstrip().endswith(b"data: [DONE]")
        assert await asyncio.wait_for(proc.wait(), 60) == 0


async def test_invalid_rules_exit_nonzero_with_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("backends:\n  a: {url: 'ftp://x'}\nroutes: []\n")
    proc = await start("serve", "--rules", str(tmp_path), "--port", str(free_port()))
    _, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode != 0
    assert f"{tmp_path / 'bad.yaml'}:2:" in stderr.decode()
    check = await start("check", str(tmp_path))
    _, check_err = await asyncio.wait_for(check.communicate(), 60)
    assert check.returncode == 1 and "bad.yaml:2:" in check_err.decode()


@pytest.mark.parametrize("rules_dir", ["rules", "compose/rules"])
async def test_check_accepts_the_shipped_rules(rules_dir: str) -> None:
    proc = await start("check", rules_dir)
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stderr.decode()
    assert "ok" in stdout.decode()


BROKEN_CORPUS = ROOT / "tests" / "fixtures" / "broken-rules"


@pytest.mark.parametrize("case", sorted(p.name for p in BROKEN_CORPUS.iterdir() if p.is_dir()))
def test_check_lists_every_error_of_the_broken_corpus(case: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Each tests/fixtures/broken-rules/<case>/ holds rule files and expected.txt, the exact lines `check`
    prints ('{dir}' = the case's directory). In-process: the exit-code plumbing is the tests above."""
    directory = BROKEN_CORPUS / case
    expected = [line.replace("{dir}", str(directory))
                for line in (directory / "expected.txt").read_text().splitlines() if line]
    assert check(str(directory)) == 1
    out, err = capsys.readouterr()
    assert err.splitlines() == [*expected, f"{directory}: {len(expected)} error(s)"]
    assert out == ""


async def test_sighup_reloads_the_rules(sim: Any, tmp_path: Path) -> None:
    runtime_a, a = await sim()
    runtime_b, b = await sim()
    rules = tmp_path / "rules.yaml"
    rules.write_text(simple_rules(a))
    port = free_port()
    # --no-watch: the file watcher would otherwise race the signal to the edit.
    async with reaped(await start("serve", "--rules", str(tmp_path), "--port", str(port), "--no-watch")) as proc:
        assert proc.stderr is not None
        await wait_for_line(proc.stderr, "listening")
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        await client.chat.completions.create(model="my-model", messages=MESSAGES, max_tokens=2)

        rules.write_text(simple_rules(b))
        proc.send_signal(signal.SIGHUP)
        line = await wait_for_line(proc.stderr, "rules reloaded (signal)")
        assert "generation 2" in line
        await client.chat.completions.create(model="my-model", messages=MESSAGES, max_tokens=2)
        assert (runtime_a.stats.requests, runtime_b.stats.requests) == (1, 1)

        rules.write_text(simple_rules(b).replace("kind: vllm", "kind: vlm"))
        proc.send_signal(signal.SIGHUP)
        line = await wait_for_line(proc.stderr, "rules reload (signal) rejected")
        assert f"{rules}:4: backend 'b0': kind must be one of" in line and "Traceback" not in line
        await client.chat.completions.create(model="my-model", messages=MESSAGES, max_tokens=2)
        assert runtime_b.stats.requests == 2  # the last good rules keep serving

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0


async def test_demo_starts_and_answers() -> None:
    port = free_port()
    async with reaped(await start("demo", "--port", str(port))) as proc:
        assert proc.stdout is not None
        line = await wait_for_line(proc.stdout, "base_url")
        assert f"http://127.0.0.1:{port}/v1" in line
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        chat = await client.chat.completions.create(model="llama-3.1-8b", messages=MESSAGES, max_tokens=5)
        assert chat.choices[0].message.content
        stream = await client.chat.completions.create(model="llama-3.1-8b", messages=MESSAGES, max_tokens=3, stream=True)
        assert len([c async for c in stream]) == 3
        embedding = await client.embeddings.create(model="text-embedding-3-small", input="hello")
        assert embedding.data[0].embedding
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
