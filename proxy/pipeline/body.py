"""Reading a client's request body: the one reader, with the content-type check, the size limit and a deadline.

Every endpoint that takes a JSON body (inference, feedback) reads it here, so the limits are checked the
same way everywhere: the size before reading when the length is announced, while reading when it is not;
the whole body must arrive within `read_timeout` seconds (a slow client gets 408 and its connection closed).
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from proxy.errors import (
    BodyTooLargeError,
    ContentEncodingError,
    ContentTypeError,
    ExpectationError,
    RequestTimeoutError,
    error_body,
)

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


async def read_body(request: web.Request, limit: int, timeout: float) -> bytes:
    """The whole body within `timeout` seconds, refusing anything over `limit` (before reading it when the
    length is announced)."""
    try:
        async with asyncio.timeout(timeout):
            return await _read(request, limit)
    except TimeoutError:
        raise RequestTimeoutError(f"The request body did not arrive within {timeout:g}s.") from None


async def _read(request: web.Request, limit: int) -> bytes:
    encoding = request.headers.get("Content-Encoding")
    if encoding is not None and encoding.strip().lower() not in ("", "identity"):
        raise ContentEncodingError("Compressed request bodies are not accepted: send the JSON uncompressed.")
    content_type = request.headers.get("Content-Type")
    if content_type is not None and "json" not in content_type.lower():
        raise ContentTypeError(f"Unsupported Content-Type '{content_type[:64]}': send application/json.")
    length = request.content_length
    too_large = BodyTooLargeError(f"The request body is larger than the limit of {limit} bytes.")
    if length is not None:
        if length > limit:
            raise too_large
        return await request.read()
    parts = []
    size = 0
    async for part in request.content.iter_any():
        size += len(part)
        if size > limit:
            raise too_large
        parts.append(part)
    return b"".join(parts)


async def expect_handler(request: web.Request) -> web.StreamResponse | None:
    """aiohttp's `Expect:` hook for routes that read a body (it runs before middlewares, so it answers
    instead of raising): `100-continue` is honoured, anything else is a JSON 417, never aiohttp's text."""
    if request.version < (1, 1):
        return None  # HTTP/1.0 has no Expect (aiohttp's own handler ignores it there too)
    if request.headers.get("Expect", "").strip().lower() == "100-continue":
        await request.writer.write(CONTINUE)
        request.writer.output_size = 0  # (as aiohttp does: the answer's own head is still to come)
        return None
    error = ExpectationError("Only `Expect: 100-continue` is supported.")
    response = web.Response(status=error.status, body=error_body(error), content_type="application/json")
    response.force_close()
    return response
