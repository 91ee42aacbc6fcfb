"""Hot reload of the rules directory, all-or-nothing, and the file watcher that triggers it.

`Reloader.reload()` parses the directory in a worker thread, then swaps the snapshot and syncs backend
state on the event loop with no await in between: a request sees the old rules or the new ones, never a mix,
and keeps the snapshot it started with. A rejected load changes nothing but `last_error`. Callers: the
watcher (started by app.py's cleanup_ctx), SIGHUP in `cli.serve`, POST /admin/reload (`admin/rules.py`).
Whoever must follow a swap (backend state, metrics) is told through the callbacks `app.py` gives at wiring
time: this module imports nothing above the ground floor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from watchfiles import Change, awatch

from proxy.config.loader import RULE_SUFFIXES, RulesError, load_rules
from proxy.config.model import RulesHolder, Snapshot

log = logging.getLogger("splitstream.rules")

# Editors save in several writes (truncate, write, rename): changes are grouped until none came for STEP_MS,
# for at most DEBOUNCE_MS. STEP_MS is also how long the watch thread takes to notice it should stop.
DEBOUNCE_MS = 100
STEP_MS = 50

SUCCESS = "success"
ERROR = "error"
UNCHANGED = "unchanged"  # the files hash the same as the running snapshot's: nothing to swap


@dataclass(frozen=True, slots=True)
class ReloadOutcome:
    """What one reload attempt did. `generation` is the one serving afterwards; `at` is wall-clock time."""

    result: str  # SUCCESS | ERROR | UNCHANGED
    trigger: str  # watch | signal | admin | whoever called reload()
    generation: int
    at: float
    duration: float  # seconds spent loading and validating
    errors: tuple[str, ...] = ()  # 'file:line: message' for ERROR


def is_rule_change(change: Change, path: str) -> bool:
    """Whether a change in the directory can change the rules (editor swap and backup files cannot)."""
    name = os.path.basename(path)
    # Kubernetes ConfigMap volumes swap a `..data` symlink; the rule files themselves never change there.
    return name.startswith("..data") or (name.endswith(RULE_SUFFIXES) and not name.startswith("."))


def _ignore(_: object) -> None:
    pass


class Reloader:
    """Owns reloading: the directory, the running generation, when it was loaded and the last rejection.

    A lock keeps two reloads from interleaving, so generations go up by one and never race. `on_swap` is
    called with the new snapshot just before it becomes current, with no await in between (backend state
    follows it atomically); `on_outcome` with every attempt's outcome that loaded or rejected files."""

    def __init__(
        self,
        rules_dir: str | Path | None,
        holder: RulesHolder,
        *,
        on_swap: Callable[[Snapshot], None] = _ignore,
        on_outcome: Callable[[ReloadOutcome], None] = _ignore,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.rules_dir = None if rules_dir is None else str(rules_dir)
        self._holder = holder
        self._on_swap = on_swap
        self._on_outcome = on_outcome
        self._env = env  # api_key_env values; None = os.environ (as at startup)
        self._clock = clock
        self.loaded_at = clock()
        self.last_error: ReloadOutcome | None = None
        self.watching = asyncio.Event()  # set once file changes can no longer go unnoticed
        self._lock = asyncio.Lock()
        self._settled = asyncio.Condition()  # notified after every attempt (see `wait_until`)
        self._stop: _StopSignal | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def generation(self) -> int:
        return self._holder.current.generation

    async def reload(self, trigger: str) -> ReloadOutcome:
        """Load the directory and swap it in if it is valid and different. Never raises for bad rules."""
        if self.rules_dir is None:
            raise RuntimeError("this app was built from a snapshot, without a rules directory to reload")
        async with self._lock:
            outcome = await self._load_and_swap(self.rules_dir, trigger)
        async with self._settled:
            self._settled.notify_all()
        return outcome

    async def _load_and_swap(self, rules_dir: str, trigger: str) -> ReloadOutcome:
        loop = asyncio.get_running_loop()
        started = loop.time()
        current = self._holder.current
        try:
            # YAML parsing of a large rule set would stall every stream for its duration: use a thread.
            snapshot = await asyncio.to_thread(load_rules, rules_dir, self._env, current.generation + 1)
        except RulesError as exc:
            outcome = ReloadOutcome(ERROR, trigger, current.generation, self._clock(), loop.time() - started,
                                    exc.errors)
            self.last_error = outcome
            self._on_outcome(outcome)
            log.error("rules reload (%s) rejected, generation %d keeps serving: %d error%s: %s", trigger,
                      current.generation, len(exc.errors), "" if len(exc.errors) == 1 else "s",
                      " | ".join(exc.errors))
            return outcome
        duration = loop.time() - started
        self.last_error = None  # the files on disk are valid again
        if snapshot.files == current.files:
            log.debug("rules reload (%s): files unchanged, generation %d", trigger, current.generation)
            return ReloadOutcome(UNCHANGED, trigger, current.generation, self._clock(), duration)
        # No await from here on: requests see the old snapshot or the new one with its backend state.
        self._on_swap(snapshot)
        self._holder.swap(snapshot)
        self.loaded_at = self._clock()
        log.info("rules reloaded (%s): generation %d, %d routes, %d pools, %d backends, %.0f ms", trigger,
                 snapshot.generation, len(snapshot.routes), len(snapshot.pools), len(snapshot.backends),
                 duration * 1000)
        outcome = ReloadOutcome(SUCCESS, trigger, snapshot.generation, self.loaded_at, duration)
        self._on_outcome(outcome)
        return outcome

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once `predicate()` holds, checking after every reload attempt (tests await this)."""
        async with self._settled:
            await self._settled.wait_for(predicate)

    async def wait_for_generation(self, generation: int) -> None:
        await self.wait_until(lambda: self.generation >= generation)

    def request_reload(self, trigger: str) -> None:
        """Reload in a task this reloader owns: for callers that cannot await (signal handlers)."""
        if self._closed:
            return
        task = asyncio.get_running_loop().create_task(self._reload_logged(trigger))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload_logged(self, trigger: str) -> None:
        try:
            await self.reload(trigger)
        except Exception:  # a bug, not bad rules: keep watching and serving, say so once
            log.exception("rules reload (%s) failed unexpectedly", trigger)

    def start_watching(self) -> None:
        """Start the watcher task on the running loop (no-op without a rules directory); `close()` stops it."""
        if self.rules_dir is None or self._watcher is not None or self._closed:
            return
        loop = asyncio.get_running_loop()
        self._stop = _StopSignal(loop, self._on_watching)
        self._watcher = loop.create_task(self._watch(self.rules_dir, self._stop), name="splitstream-rules-watcher")

    def _on_watching(self) -> None:
        self.watching.set()
        # An edit made between the startup load and this moment raised no event: catch up with one reload.
        self.request_reload("watch")

    async def _watch(self, rules_dir: str, stop: _StopSignal) -> None:
        try:
            async for _ in awatch(rules_dir, watch_filter=is_rule_change, debounce=DEBOUNCE_MS, step=STEP_MS,
                                  stop_event=stop, recursive=False):
                await self._reload_logged("watch")
        except OSError as exc:
            log.error("cannot watch rules directory %s (%s): reload with SIGHUP or POST /admin/reload",
                      rules_dir, exc.strerror or exc)
        except Exception:  # the watch backend failed: serving goes on, reloads still work by signal or admin
            log.exception("rules watcher stopped: reload with SIGHUP or POST /admin/reload")

    async def close(self) -> None:
        """Stop the watcher and cancel reloads in progress (none is half-applied: the swap has no await)."""
        self._closed = True
        if self._stop is not None:
            self._stop.set()  # the watch thread checks it every STEP_MS; cancelling alone waits for that
        tasks = [t for t in (self._watcher, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._watcher = None


class _StopSignal(asyncio.Event):
    """The watch thread's stop flag. That thread calls `is_set()` every STEP_MS from the moment it watches,
    so the first call is when changes can no longer be missed: it tells the loop (`on_watching`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_watching: Callable[[], None]) -> None:
        super().__init__()
        self._loop = loop
        self._on_watching: Callable[[], None] | None = on_watching

    def is_set(self) -> bool:
        on_watching, self._on_watching = self._on_watching, None
        if on_watching is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed first: nobody is waiting
                self._loop.call_soon_threadsafe(on_watching)
        return super().is_set()


RELOADER = web.AppKey("RELOADER", Reloader)
