"""The one middleware: owns each request's record and turns exceptions into OpenAI error responses.

It creates the request record first and finishes it last, so every request is logged and metered exactly
once. `SplitstreamError`s render as their JSON body (`proxy/errors.py`); unknown exceptions become a 500,
logged once with their traceback; cancellation (client gone) is recorded and re-raised, never swallowed.
Every request gets a fresh unguessable id of ours (`RequestIds`), under which a routed one is joined for
feedback with its hashed tenant; a client's X-Request-Id is only echoed for tracing.
Built once by `app.py` with the parts it needs (`error_middleware(recorder, ids)`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref

from aiohttp import hdrs, web

from proxy.errors import SplitstreamError, UnknownPathError, error_body
from proxy.observe.record import CLIENT_CLOSED, NONE, Recorder, RequestRecord
from proxy.pipeline.cache_policy import owner_of
from proxy.pipeline.headers import routing_headers
from proxy.pipeline.request import ENDPOINT_BY_PATH
from proxy.types import Handler, Middleware

log = logging.getLogger("splitstream")

RECORD = web.RequestKey("RECORD", RequestRecord)

MAX_REQUEST_ID_LENGTH = 128
ID_BYTES = 16  # 128 random bits per id: 32 lowercase hex digits
_ID_CHARS = 2 * ID_BYTES
_BATCH_BYTES = 256 * ID_BYTES  # one getrandom() per 256 ids


class RequestIds:
    """Unguessable request ids: each is 128 bits from the OS CSPRNG as 32 hex digits, nothing else (no
    counter, no process prefix), so knowing any number of ids tells nothing about another. The bytes are
    read 4 KiB at a time (~0.15 µs an id, against ~0.5 µs for one `os.urandom` call); a forked child
    drops its parent's unused ones, so two processes never hand out the same id."""

    __slots__ = ("_hex", "_at", "__weakref__")

    def __init__(self) -> None:
        self._hex = ""
        self._at = 0
        _LIVE.add(self)

    def next(self) -> str:
        at = self._at
        if at >= len(self._hex):
            self._hex, at = os.urandom(_BATCH_BYTES).hex(), 0
        self._at = at + _ID_CHARS
        return self._hex[at:at + _ID_CHARS]

    def _forget(self) -> None:
        self._hex, self._at = "", 0


_LIVE: weakref.WeakSet[RequestIds] = weakref.WeakSet()


def _after_fork() -> None:
    for ids in _LIVE:
        ids._forget()


os.register_at_fork(after_in_child=_after_fork)


def error_response(exc: SplitstreamError, record: RequestRecord) -> web.Response:
    """The error as JSON in the shape of the client's API (the path's), with the same routing headers a
    successful answer would have carried."""
    headers = routing_headers(record, {})
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    body = error_body(exc, ENDPOINT_BY_PATH.get(record.path, ""))
    response = web.Response(body=body, status=exc.status, content_type="application/json", headers=headers)
    if exc.closes_connection:
        response.force_close()
    return response


def _from_http_exception(exc: web.HTTPException) -> SplitstreamError:
    if exc.status == 404:
        return UnknownPathError("Unknown request URL. Please check the URL for typos.")
    error = SplitstreamError(exc.reason or "request failed")
    error.status = exc.status
    error.type = "invalid_request_error" if exc.status < 500 else "server_error"
    error.code = exc.reason.lower().replace(" ", "_") if exc.reason else "http_error"
    return error


def error_middleware(recorder: Recorder, ids: RequestIds) -> Middleware:
    """The app's middleware, closed over the recorder and the id source (no per-request lookups)."""

    def new_record(request: web.Request, started: float) -> RequestRecord:
        """The record under our own fresh id (`splitstream_id`, what feedback joins are keyed by) and, for
        tracing, the client's X-Request-Id when it is a sane token (echoed in the response and upstream),
        else ours again. A client's id names nothing but its own request: it can never rebind a join."""
        own = ids.next()
        given = request.headers.get("X-Request-Id")
        if given and len(given) <= MAX_REQUEST_ID_LENGTH and given.isascii() and given.isprintable():
            record = RequestRecord(given, request.method, request.path, started)
            record.splitstream_id = own
            return record
        return RequestRecord(own, request.method, request.path, started)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        loop_time = asyncio.get_running_loop().time
        record = new_record(request, loop_time())
        record.client = request.remote or ""
        request[RECORD] = record
        if recorder.tracing is not None:
            recorder.begin(record, request.headers)
        try:
            response = await handler(request)
            if not record.status:
                record.status = response.status
            return response
        except SplitstreamError as exc:
            record.status, record.error = exc.status, exc.code
            return error_response(exc, record)
        except web.HTTPException as exc:
            error = _from_http_exception(exc)
            record.status, record.error = error.status, error.code
            return error_response(error, record)
        except asyncio.CancelledError:
            record.status = CLIENT_CLOSED
            raise
        except Exception:
            log.exception("unhandled error in request %s", record.request_id)
            internal = SplitstreamError("The server had an error while processing your request.")
            record.status, record.error = internal.status, internal.code
            return error_response(internal, record)
        finally:
            if record.route is not NONE and not record.owner:  # routed requests are joined for feedback
                record.owner = owner_of(record.tenant, request.headers.get(hdrs.AUTHORIZATION))  # (unless the cache did)
            recorder.finish(record, loop_time())

    return middleware
