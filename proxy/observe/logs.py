"""Structured logs: one JSON object per line on stderr.

Operational records go through `logging` with a JSON formatter. Access lines (one per request, built in
`observe/record.py`) skip `logging`: at thousands of requests/s its per-record machinery and per-line
flush cost more than the proxying itself, so `AccessLog` buffers lines and flushes at most every
FLUSH_SECONDS (and at shutdown). Nothing here may log request or response bodies.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import BinaryIO

import orjson

# How stale a tail of the access log may get under light traffic; heavy traffic flushes on size.
FLUSH_SECONDS = 0.2
FLUSH_BYTES = 64 * 1024


def _printable(value: object) -> object:
    return value.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(value, str) else value


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
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
    """Buffered writer of access lines; `enabled` follows the `splitstream.access` logger's level."""

    __slots__ = ("_out", "_buffer", "_timer", "enabled")

    def __init__(self, out: BinaryIO | None = None) -> None:
        self._out = out if out is not None else sys.stderr.buffer
        self._buffer = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self.enabled = logging.getLogger("splitstream.access").isEnabledFor(logging.INFO)

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
