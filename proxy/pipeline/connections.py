"""Client connections: a request head must arrive within `server.read_timeout`, or the connection closes.

aiohttp bounds a head's size but not its duration, so a client sending one byte every few seconds holds a
socket (and the memory of its partial head) for as long as it likes. `HeadDeadlineRunner` is an aiohttp
`AppRunner` whose connections arm a timer at the first byte of each request head and disarm it when the
head is complete; a timer that fires answers 408 (the request was never read, so a reply is still
possible) and closes. The body has its own deadline where it is read (`pipeline/body.py`), and nothing
counts as in flight before both arrived (`pipeline/handler.py`). Requests aiohttp's parser refuses are
answered in the OpenAI error shape (never its plain text, which echoes the client's bytes) and logged as
one warning line, so a client cannot fill the error log with tracebacks. Used by `cli.serve`.

This leans on aiohttp's `RequestHandler` internals (`_request_count`, `_current_request`), which are
stable across 3.x; `tests/integration/test_hostile_clients.py` pins the behaviour against a real process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from proxy.errors import MalformedHttpError, RequestTimeoutError, SplitstreamError, error_body

log = logging.getLogger("splitstream")


def _timeout_answer() -> bytes:
    body = error_body(RequestTimeoutError("The request head did not arrive in time."))
    head = (f"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n")
    return head.encode("latin-1") + body


TIMEOUT_ANSWER = _timeout_answer()


class HeadDeadlineHandler(RequestHandler):
    """aiohttp's per-connection protocol, plus a deadline on every request head."""

    def __init__(self, manager: Server, *, head_timeout: Callable[[], float], **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout = head_timeout
        self._head_timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        count = self._request_count
        super().data_received(data)
        if self._request_count != count:
            self._disarm()  # a head completed in time
        elif self._head_timer is None and self._current_request is None:
            # Bytes while no request is being handled: the start of the next head (body bytes of a request
            # arrive while its handler runs, under the body's own deadline).
            self._head_timer = asyncio.get_running_loop().call_later(self._head_timeout(), self._expire)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        """aiohttp's answer when it could not parse a request (or, a bug, a handler escaped the middleware):
        the OpenAI error shape instead of text that echoes the client's bytes. A malformed request is the
        client's doing and logs one warning line without its bytes; anything 5xx keeps its traceback."""
        if status >= 500:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
            error = SplitstreamError("The server had an error while processing your request.")
            error.status = status
        else:
            log.warning("malformed request from %s: %s", request.remote, type(exc).__name__ if exc else status)
            error = MalformedHttpError("The request is not valid HTTP/1.1.")
            error.status = status
        if request.writer.output_size > 0:
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        response = web.Response(status=status, body=error_body(error), content_type="application/json")
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        """A body we refused unread is still drained (so the client can read our answer); if it is not what
        its headers claim (gzip that is not), aiohttp logs that as an unhandled exception. The client's
        doing: one warning line, no traceback."""
        exc = kwargs.get("exc_info")
        if isinstance(exc, (RequestPayloadError, HttpProcessingError)):
            log.warning("malformed request body from a client: %s", type(exc).__name__)
            return
        super().log_exception(*args, **kwargs)

    def _expire(self) -> None:
        self._head_timer = None
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(TIMEOUT_ANSWER)
            transport.close()


class _HeadDeadlineServer(Server):
    def __call__(self) -> RequestHandler:
        return HeadDeadlineHandler(self, loop=self._loop, **self._kwargs)


class HeadDeadlineRunner(web.AppRunner):
    """An `AppRunner` whose connections use `HeadDeadlineHandler`; `head_timeout()` is read per head, so a
    rules reload that changes `server.read_timeout` applies to the next one."""

    def __init__(self, app: web.Application, *, head_timeout: Callable[[], float], **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._kwargs["head_timeout"] = head_timeout

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        # aiohttp builds its Server inside Application._make_handler; its class decides the protocol. The
        # subclass adds no state, so switching the class keeps everything aiohttp set up.
        server.__class__ = _HeadDeadlineServer
        return server
