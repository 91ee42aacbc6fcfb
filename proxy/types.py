"""Type aliases shared across modules (aiohttp `typedefs.py`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import typedefs, web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = typedefs.Middleware  # what `web.Application(middlewares=...)` takes
Clock = Callable[[], float]  # seconds on a monotonic clock (the event loop's, or a test's fake)

