"""Structured logs: one JSON object per line on stderr, every line carrying `ts`, `level` and `msg`.

Operational records go through `logging` with a JSON formatter. Access lines (one per request, built in
`observe/record.py`) skip `logging`: at thousands of requests/s its per-record machinery and per-line
flush cost more than the proxying itself, so `AccessLog` buffers lines and flushes at most every
FLUSH_SECONDS (and at shutdown). The schema of both is the README's "Logs" table. Nothing here may log
request or response bodies.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import BinaryIO

import orjson

# How stale a tail of the access log may get under light traffic; heavy traffic flushes on size.
FLUSH_SECONDS = 0.2
FLUSH_BYTES = 64 * 1024

# Probes and scrapes: every few seconds from every orchestrator and Prometheus, and alike each time, so they
# would drown the lines an operator reads; logged only when asked (`serve --log-probes`).
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

_MILLIS = tuple(f".{millis:03d}Z" for millis in range(1000))


class Timestamps:
    """RFC 3339 UTC timestamps with milliseconds (`2026-12-02T13:04:05.123Z`), what log pipelines parse
    without a format hint. The text up to the second is kept: `strftime` (~1 µs) per access line would
    cost more than encoding the rest of the line, and at thousands of lines/s most lines share a second."""

    __slots__ = ("_cached",)

    def __init__(self) -> None:
        self._cached = (-1, "")  # (second, its text): one attribute, so a reader never pairs two seconds

    def format(self, seconds: float) -> str:
        """`seconds` since the epoch (`time.time()`), truncated to the millisecond."""
        # Milliseconds first: `seconds - int(seconds)` would turn .123 into 122.99... ms.
        whole, millis = divmod(int(seconds * 1000), 1000)
        second, prefix = self._cached
        if whole != second:
            prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
            self._cached = (whole, prefix)
        return prefix + _MILLIS[millis]  # a lookup: half the cost of formatting the number


def _printable(value: object) -> object:
    return value.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(value, str) else value


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._timestamps = Timestamps()

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": self._timestamps.format(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        try:
            return orjson.dumps(entry).decode()
        except orjson.JSONEncodeError:  # text quoting a client's undecodable bytes: escape, never lose the line
            return orjson.dumps({k: _printable(v) for k, v in entry.items()}).decode()


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # "N changes detected": our reload line says more


class AccessLog:
    """Buffered writer of access lines; `enabled` follows the `splitstream.access` logger's level.

    `skipped_paths` are the request paths not logged: PROBE_PATHS unless `log_probes` (the recorder checks
    it per request, so it is a frozenset lookup)."""

    __slots__ = ("_out", "_buffer", "_timer", "_timestamps", "enabled", "skipped_paths")

    def __init__(self, out: BinaryIO | None = None, log_probes: bool = False) -> None:
        self._out = out if out is not None else sys.stderr.buffer
        self._buffer = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._timestamps = Timestamps()
        self.enabled = logging.getLogger("splitstream.access").isEnabledFor(logging.INFO)
        self.skipped_paths: frozenset[str] = frozenset() if log_probes else PROBE_PATHS

    def timestamp(self) -> str:
        """Now, as an access line's `ts` (wall clock: the request's own times are the loop's monotonic clock)."""
        return self._timestamps.format(time.time())

    def write(self, entry: dict[str, object]) -> None:
        try:
            line = orjson.dumps(entry, option=orjson.OPT_APPEND_NEWLINE)
        except orjson.JSONEncodeError:
            line = orjson.dumps({k: _printable(v) for k, v in entry.items()}, option=orjson.OPT_APPEND_NEWLINE)
        self._buffer += line
        if len(self._buffer) >= FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self.flush)
            except RuntimeError:  # no loop (unit use): write through
                self.flush()

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._buffer:
            data, self._buffer = bytes(self._buffer), bytearray()
            try:
                self._out.write(data)
                self._out.flush()
            except (OSError, ValueError):
                pass  # stderr closed or full: losing log lines must not fail requests
