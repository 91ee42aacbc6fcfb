"""Unit tests for `proxy.config.reloader`: outcomes, all-or-nothing swaps, generations, metrics, backend
sync and the watch filter. Real files in tmp_path and a worker thread for parsing; no sockets, no watcher."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from watchfiles import Change

from proxy.config.loader import load_rules
from proxy.config.model import RulesHolder
from proxy.config.reloader import ERROR, SUCCESS, UNCHANGED, Reloader, is_rule_change
from proxy.observe.metrics import Metrics
from proxy.upstream.state import BackendStates

NOW = 1_700_000_000.0


def rules(pool_members: str = "a", comment: str = "") -> str:
    return f"""# {comment}
backends:
  a: {{url: "http://127.0.0.1:8001"}}
  b: {{url: "http://127.0.0.1:8002"}}
pools:
  p: {{backends: [{pool_members}]}}
routes:
  - name: main
    match: {{model: m}}
    pool: p
"""


class Parts:
    """A reloader over real parts, as app.py wires it."""

    def __init__(self, directory: Path, text: str) -> None:
        self.file = directory / "rules.yaml"
        self.file.write_text(text)
        snapshot = load_rules(directory, env={}, generation=1)
        self.holder = RulesHolder(snapshot)
        self.backends = BackendStates()
        self.backends.sync(snapshot.backends)
        self.metrics = Metrics()
        self.clock = [NOW]
        self.reloader = Reloader(directory, self.holder, on_swap=lambda new: self.backends.sync(new.backends),
                                 on_outcome=self.metrics.record_reload, env={}, clock=lambda: self.clock[0])

    def count(self, result: str) -> float:
        value = self.metrics.registry.get_sample_value("splitstream_rules_reloads_total", {"result": result})
        return value or 0.0


@pytest.fixture
def parts(tmp_path: Path) -> Parts:
    return Parts(tmp_path, rules())


async def test_unchanged_files_do_not_bump_the_generation(parts: Parts) -> None:
    outcome = await parts.reloader.reload("test")
    assert (outcome.result, outcome.generation, outcome.errors) == (UNCHANGED, 1, ())
    assert parts.holder.current.generation == 1
    assert parts.count(SUCCESS) == parts.count(ERROR) == 0  # nothing was loaded: not a reload


async def test_a_valid_edit_is_swapped_in(parts: Parts) -> None:
    before = parts.holder.current
    parts.file.write_text(rules("a, b"))
    parts.clock[0] = NOW + 5
    outcome = await parts.reloader.reload("test")
    assert (outcome.result, outcome.generation, outcome.trigger, outcome.at) == (SUCCESS, 2, "test", NOW + 5)
    current = parts.holder.current
    assert current is not before and current.generation == 2
    assert [b.name for b in current.pools[0].backends] == ["a", "b"]
    assert parts.reloader.loaded_at == NOW + 5 and parts.reloader.last_error is None
    assert parts.count(SUCCESS) == 1
    assert parts.metrics.registry.get_sample_value("splitstream_rules_generation") == 2.0


async def test_a_comment_changes_the_hash_and_so_the_generation(parts: Parts) -> None:
    parts.file.write_text(rules(comment="reviewed"))
    assert (await parts.reloader.reload("test")).result == SUCCESS
    assert parts.reloader.generation == 2


async def test_an_invalid_edit_changes_nothing_but_last_error(parts: Parts) -> None:
    before = parts.holder.current
    parts.file.write_text(rules("a, ghost"))
    parts.clock[0] = NOW + 7
    outcome = await parts.reloader.reload("test")
    assert (outcome.result, outcome.generation) == (ERROR, 1)
    assert outcome.errors == (f"{parts.file}:6: pool 'p': backend 'ghost' is not defined",)
    assert parts.holder.current is before
    assert parts.reloader.last_error == outcome and parts.reloader.loaded_at == NOW
    assert parts.count(ERROR) == 1 and parts.count(SUCCESS) == 0

    parts.file.write_text(rules())  # back to exactly what runs: nothing to swap, and no error any more
    assert (await parts.reloader.reload("test")).result == UNCHANGED
    assert parts.reloader.last_error is None and parts.reloader.generation == 1


async def test_a_half_written_file_fails_and_the_next_reload_applies_it(parts: Parts) -> None:
    full = rules("a, b")
    parts.file.write_text(full[: full.index("routes:")])  # the writer is not done yet
    assert (await parts.reloader.reload("test")).result == ERROR
    parts.file.write_text(full)
    assert (await parts.reloader.reload("test")).result == SUCCESS
    assert parts.reloader.generation == 2


async def test_concurrent_reloads_never_interleave(parts: Parts) -> None:
    parts.file.write_text(rules("a, b"))
    outcomes = await asyncio.gather(*(parts.reloader.reload(f"r{i}") for i in range(4)))
    assert sorted(o.result for o in outcomes) == [SUCCESS, UNCHANGED, UNCHANGED, UNCHANGED]
    assert parts.reloader.generation == 2


async def test_wait_hooks_return_once_the_reload_settled(parts: Parts) -> None:
    parts.file.write_text(rules("a, b"))
    waiter = asyncio.ensure_future(parts.reloader.wait_for_generation(2))
    await parts.reloader.reload("test")
    await waiter
    parts.file.write_text("routes: [")
    error_seen = asyncio.ensure_future(parts.reloader.wait_until(lambda: parts.reloader.last_error is not None))
    await parts.reloader.reload("test")
    await error_seen


async def test_removed_backend_drains_then_is_forgotten(parts: Parts) -> None:
    parts.file.write_text(rules("a, b"))
    await parts.reloader.reload("test")
    state_b = next(s for s in parts.backends if s.backend.name == "b")
    lease = state_b.lease(1.0)

    parts.file.write_text(rules("a").replace('  b: {url: "http://127.0.0.1:8002"}\n', ""))
    assert (await parts.reloader.reload("test")).result == SUCCESS
    assert {s.backend.name for s in parts.backends} == {"a", "b"}  # b drains: a request is still on it
    lease.release()
    assert [s.backend.name for s in parts.backends] == ["a"]


async def test_reload_without_a_directory_is_a_programming_error() -> None:
    snapshot = load_rules(Path(__file__).resolve().parents[2] / "rules", env={})
    reloader = Reloader(None, RulesHolder(snapshot))
    with pytest.raises(RuntimeError):
        await reloader.reload("test")


@pytest.mark.parametrize(
    ("path", "relevant"),
    [
        ("/r/rules.yaml", True),
        ("/r/10-routes.yml", True),
        ("/r/.rules.yaml.swp", False),
        ("/r/.hidden.yaml", False),
        ("/r/rules.yaml~", False),
        ("/r/4913", False),  # vim's probe file
        ("/r/README.md", False),
        ("/r/..data", True),  # Kubernetes ConfigMap volume update
        ("/r/..data_tmp", True),
    ],
)
def test_watch_filter(path: str, relevant: bool) -> None:
    assert is_rule_change(Change.modified, path) is relevant
