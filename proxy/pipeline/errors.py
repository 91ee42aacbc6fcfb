"""Errors as clients see them: the one middleware that turns exceptions into OpenAI error responses.

The middleware also owns the request record (created first, finished last), so every request is logged
and metered exactly once. Unknown exceptions become a 500 and are logged once with their traceback;
cancellation (client gone) is recorded and re-raised, never swallowed.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from proxy.context import CONTEXT
from proxy.errors import SplitstreamError, UnknownPathError, error_body
from proxy.observe.record import CLIENT_CLOSED, NONE, RequestRecord, finish
from proxy.types import Handler

log = logging.getLogger("splitstream")

RECORD = web.RequestKey("RECORD", RequestRecord)

MAX_REQUEST_ID_LENGTH = 128


def error_response(exc: SplitstreamError, record: RequestRecord) -> web.Response:
    """The error as JSON, with the same routing headers a successful answer would have carried."""
    headers = {"x-request-id": record.request_id}
    if record.route is not NONE:
        headers["x-splitstream-route"] = record.route
        headers["x-splitstream-variant"] = record.variant
        headers["x-splitstream-backend"] = record.backend
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return web.Response(
        body=error_body(exc), status=exc.status, content_type="application/json", headers=headers
    )


def _request_id(request: web.Request) -> str:
    """The client's X-Request-Id when it is a sane token (it is echoed into upstream headers), else ours."""
    given = request.headers.get("X-Request-Id")
    if given and len(given) <= MAX_REQUEST_ID_LENGTH and given.isascii() and given.isprintable():
        return given
    return request.app[CONTEXT].ids.next()


def _from_http_exception(exc: web.HTTPException) -> SplitstreamError:
    if exc.status == 404:
        return UnknownPathError("Unknown request URL. Please check the URL for typos.")
    error = SplitstreamError(exc.reason or "request failed")
    error.status = exc.status
    error.type = "invalid_request_error" if exc.status < 500 else "server_error"
    error.code = exc.reason.lower().replace(" ", "_") if exc.reason else "http_error"
    return error


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    context = request.app[CONTEXT]
    loop_time = asyncio.get_running_loop().time
    record = RequestRecord(_request_id(request), request.method, request.path, loop_time())
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
        finish(record, context.metrics, context.access_log, loop_time(), context.stats, context.feedback)
