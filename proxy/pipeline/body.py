"""Reading a client's request body: the one reader, with the content-type check and the size limit.

Every endpoint that takes a JSON body (inference, feedback) reads it here, so the limit is checked the
same way everywhere: before reading when the length is announced, while reading when it is not.
"""

from __future__ import annotations

from aiohttp import web

from proxy.errors import BodyTooLargeError, ContentTypeError


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, refusing anything over `limit` before reading it when the length is announced."""
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
