"""The one middleware: owns each request's record and turns exceptions into OpenAI error responses.

It creates the request record first and finishes it last, so every request is logged and metered exactly
once. `SplitstreamError`s render as their JSON body (`proxy/errors.py`); unknown exceptions become a 500,
logged once with their traceback; cancellation (client gone) is recorded and re-raised, never swallowed.
Built once by `app.py` with the parts it needs (`error_middleware(recorder, ids)`).
"""

from __future__ import annotations

import asyncio
import logging
import os

from aiohttp import web

from proxy.errors import SplitstreamError, UnknownPathError, error_body
from proxy.observe.record import CLIENT_CLOSED, Recorder, RequestRecord
from proxy.pipeline.headers import routing_headers
from proxy.types import Handler, Middleware

log = logging.getLogger("splitstream")

RECORD = web.RequestKey("RECORD", RequestRecord)

MAX_REQUEST_ID_LENGTH = 128


class RequestIds:
    """Process-unique request ids: a random prefix and a counter (no uuid4 per request)."""

    __slots__ = ("_prefix", "_counter")

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex()
        self._counter = 0

    def next(self) -> str:
        self._counter += 1
        return f"{self._prefix}-{self._counter:x}"


def error_response(exc: SplitstreamError, record: RequestRecord) -> web.Response:
    """The error as JSON, with the same routing headers a successful answer would have carried."""
    headers = routing_headers(record, {})
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    response = web.Response(
        body=error_body(exc), status=exc.status, content_type="application/json", headers=headers
    )
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

    def request_id(request: web.Request) -> str:
        """The client's X-Request-Id when it is a sane token (it is echoed into upstream headers), else ours."""
        given = request.headers.get("X-Request-Id")
        if given and len(given) <= MAX_REQUEST_ID_LENGTH and given.isascii() and given.isprintable():
            return given
        return ids.next()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        loop_time = asyncio.get_running_loop().time
        record = RequestRecord(request_id(request), request.method, request.path, loop_time())
        request[RECORD] = record
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
            recorder.finish(record, loop_time())

    return middleware
