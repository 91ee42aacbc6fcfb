"""POST /v1/feedback: a client's score for an answer, joined to the variant that served it.

A client endpoint (client keys apply; bad input gets an OpenAI-shaped 400/404), not an admin one: the
scores feed the A/B report (`admin/rollouts.py`) through the ledger (`observe/feedback.py`). Built once
by `app.py` with the parts it needs.
"""

from __future__ import annotations

import math

import orjson
from aiohttp import web

from proxy.auth import ClientKeys
from proxy.errors import InvalidFeedbackError, MalformedBodyError, UnknownRequestError
from proxy.observe.feedback import FeedbackLedger
from proxy.pipeline.body import read_body
from proxy.pipeline.middleware import MAX_REQUEST_ID_LENGTH

MAX_FEEDBACK_BYTES = 4096  # {"request_id": ..., "score": ...} is a few dozen bytes
FEEDBACK_READ_TIMEOUT = 10.0  # a few dozen bytes take no longer than this from any client that means well


class FeedbackEndpoint:
    __slots__ = ("client_keys", "ledger")

    def __init__(self, client_keys: ClientKeys, ledger: FeedbackLedger) -> None:
        self.client_keys = client_keys
        self.ledger = ledger

    async def post(self, request: web.Request) -> web.Response:
        """{"request_id": <x-request-id of an answer>, "score": <number>}; a second score for the same request
        replaces the first."""
        self.client_keys.check(request.headers)
        body = await read_body(request, MAX_FEEDBACK_BYTES, FEEDBACK_READ_TIMEOUT)
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise MalformedBodyError("We could not parse the JSON body of your request.") from None
        if not isinstance(data, dict):
            raise MalformedBodyError("The request body must be a JSON object.")
        request_id = data.get("request_id")
        if not isinstance(request_id, str) or not request_id or len(request_id) > MAX_REQUEST_ID_LENGTH:
            raise InvalidFeedbackError("`request_id` must be the x-request-id of an answered request (a non-empty "
                                       f"string of at most {MAX_REQUEST_ID_LENGTH} characters).")
        score = data.get("score")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise InvalidFeedbackError("`score` must be a finite number.")
        served = self.ledger.score(request_id, float(score))
        if served is None:
            raise UnknownRequestError("No such request_id among the requests this server answered recently.")
        return web.json_response({"object": "feedback", "request_id": request_id, "route": served[0],
                                  "variant": served[1], "score": float(score)})
