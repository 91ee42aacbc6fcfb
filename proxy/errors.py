"""Every error a client can see, as one tree; each class carries its HTTP status, OpenAI `type` and `code`.

Raise these anywhere on the request path; `error_body` / `sse_error_event` below render them (the
middleware in `pipeline/middleware.py` as a JSON body before the response started; relays as an SSE `error`
event after). Nothing else builds an error body.

    SplitstreamError                      500 server_error / internal_error
    ├── InvalidRequestError               400 invalid_request_error
    │   ├── MalformedBodyError            400 ... / invalid_json
    │   ├── ContentTypeError              400 ... / invalid_content_type
    │   ├── MalformedHttpError            400 ... / invalid_http  (what aiohttp's HTTP parser refuses)
    │   ├── ContentEncodingError          415 ... / unsupported_content_encoding  (compressed bodies)
    │   ├── ExpectationError              417 ... / expectation_failed  (an Expect other than 100-continue)
    │   ├── BodyTooLargeError             413 ... / body_too_large
    │   ├── RequestTimeoutError           408 ... / request_timeout  (head or body slower than read_timeout)
    │   ├── UnknownModelError             404 ... / model_not_found
    │   ├── UnknownPathError              404 ... / unknown_url
    │   ├── ReloadUnavailableError        409 ... / reload_unavailable  (app built without a rules dir)
    │   ├── UnknownRouteError             404 ... / route_not_found  (A/B report of a route never seen)
    │   ├── UnknownRolloutError           404 ... / rollout_not_found  (no such route, or it has no rollout)
    │   ├── RolloutConflictError          409 ... / rollout_conflict  (e.g. resume a rollout that is not paused)
    │   ├── InvalidFeedbackError          400 ... / invalid_feedback
    │   ├── ContextLengthError            400 ... / context_length_exceeded  (a runtime's; falls back, see dispatch)
    │   ├── PreviousResponseGoneError     404 ... / previous_response_not_found  (its backend left the rules)
    │   └── UnknownRequestError           404 ... / request_not_found  (feedback for an id this process forgot)
    ├── ClientAuthError                   401 authentication_error / invalid_api_key
    ├── AdminAuthError                    401 authentication_error / invalid_admin_token
    │   └── AdminForbiddenError           403 permission_error / admin_loopback_only
    │       ├── AdminHostError             403 ... / admin_host_not_loopback  (loopback mode, Host not loopback)
    │       └── AdminCrossSiteError        403 ... / admin_cross_site  (admin POST a cross-site page could send)
    ├── OverloadedError                   429 rate_limit_error / overloaded  (+ Retry-After)
    │   └── TenantLimitError              429 ... / rate_limit_exceeded  (a tenant's limit; + x-ratelimit-*)
    ├── RolloutUnavailableError           503 api_error / rollout_store_unavailable  (admin rollout actions)
    ├── StatsUnavailableError             503 api_error / stats_store_unavailable  (the A/B report's pooled numbers)
    ├── PreviousResponseUnavailableError  503 api_error / previous_response_unavailable  (its backend failed)
    ├── StoreUnavailableError             internal: the caller falls back; never reaches a client
    └── UpstreamError                     502 api_error / upstream_error
        ├── BackendConnectError           502 ... / backend_unreachable     reason=connect
        │   └── BackendTlsError           502 ... / backend_tls_error       reason=tls  (handshake, certificate)
        ├── BackendStatusError            502 ... / backend_error           reason=status_5xx
        ├── BackendResetError             502 ... / backend_reset           reason=reset
        ├── BackendProtocolError          502 ... / backend_protocol_error  reason=protocol
        │   └── BackendBodyTooLargeError  502 ... / backend_body_too_large  (over server.max_upstream_body_bytes)
        ├── BackendTimeoutError           504 timeout_error / backend_timeout  reason=timeout
        ├── BackendThrottledError         429 rate_limit_error / backend_rate_limited  reason=status_429
        └── NoHealthyBackendError         503 api_error / no_healthy_backend
"""

from __future__ import annotations

import orjson


class SplitstreamError(Exception):
    """Root of the tree. `reason` is the closed label set of `upstream_errors_total`."""

    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"
    reason: str | None = None
    retry_after: float | None = None
    closes_connection = False  # answer, then close the client's connection instead of keeping it alive

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequestError(SplitstreamError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class MalformedBodyError(InvalidRequestError):
    code = "invalid_json"


class ContentTypeError(InvalidRequestError):
    code = "invalid_content_type"


class MalformedHttpError(InvalidRequestError):
    """Bytes aiohttp's parser refused (a control character in a header, an over-long line, a bad method):
    answered as JSON, never echoed back, and the connection closed."""

    code = "invalid_http"
    closes_connection = True


class ContentEncodingError(InvalidRequestError):
    """A compressed request body: its announced length says nothing of what it inflates to, so it is refused
    unread (and the connection closed, so nothing lingers to decompress it)."""

    status = 415
    code = "unsupported_content_encoding"
    closes_connection = True


class ExpectationError(InvalidRequestError):
    """An `Expect` other than `100-continue`."""

    status = 417
    code = "expectation_failed"
    closes_connection = True


class BodyTooLargeError(InvalidRequestError):
    status = 413
    code = "body_too_large"


class RequestTimeoutError(InvalidRequestError):
    status = 408
    code = "request_timeout"
    closes_connection = True  # the rest of a slow body is not worth waiting for


class UnknownModelError(InvalidRequestError):
    status = 404
    code = "model_not_found"


class UnknownPathError(InvalidRequestError):
    status = 404
    code = "unknown_url"


class ReloadUnavailableError(InvalidRequestError):
    status = 409
    code = "reload_unavailable"


class UnknownRouteError(InvalidRequestError):
    status = 404
    code = "route_not_found"


class UnknownRolloutError(InvalidRequestError):
    status = 404
    code = "rollout_not_found"


class RolloutConflictError(InvalidRequestError):
    """An operator action the rollout's status forbids (`delivery/state.py` has the table), or one whose
    compare-and-set kept losing to other writers (`delivery/controller.py`)."""

    status = 409
    code = "rollout_conflict"


class InvalidFeedbackError(InvalidRequestError):
    code = "invalid_feedback"


class ContextLengthError(InvalidRequestError):
    """A runtime said the prompt (and max_tokens) do not fit its context. Raised by `pipeline/dispatch.py`
    only while a route's fallback pool is left to try, which may have a longer context; with none left the
    runtime's own answer is relayed. The client's request, not the backend's failure: never an ejection."""

    code = "context_length_exceeded"


class PreviousResponseGoneError(InvalidRequestError):
    """A Responses request continues a stored response whose backend is no longer in the route's pools: the
    state it needs is gone with it (`pipeline/affinity.py`)."""

    status = 404
    code = "previous_response_not_found"


class UnknownRequestError(InvalidRequestError):
    status = 404
    code = "request_not_found"


class RolloutUnavailableError(SplitstreamError):
    """The store holding rollout state did not answer, so an operator action could not be applied."""

    status = 503
    type = "api_error"
    code = "rollout_store_unavailable"


class StatsUnavailableError(SplitstreamError):
    """The store holding the fleet's pooled statistics did not answer, so the A/B report has no numbers."""

    status = 503
    type = "api_error"
    code = "stats_store_unavailable"


class PreviousResponseUnavailableError(SplitstreamError):
    """A Responses request continues a stored response whose backend could not answer: no other backend
    holds that state, so there is nowhere else to send it (`pipeline/affinity.py`)."""

    status = 503
    type = "api_error"
    code = "previous_response_unavailable"


class ClientAuthError(SplitstreamError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class AdminAuthError(SplitstreamError):
    """/admin/* refused: SPLITSTREAM_ADMIN_TOKEN is set and the request lacks it (see `proxy/admin.py`)."""

    status = 401
    type = "authentication_error"
    code = "invalid_admin_token"


class AdminForbiddenError(AdminAuthError):
    """/admin/* refused: no admin token is configured, so only loopback clients are answered."""

    status = 403
    type = "permission_error"
    code = "admin_loopback_only"


class AdminHostError(AdminForbiddenError):
    """Loopback mode, but the Host header names something else: a rebound DNS name must read nothing."""

    code = "admin_host_not_loopback"


class AdminCrossSiteError(AdminForbiddenError):
    """An admin POST another site's page could have sent (cross-site, or a plain form's content type)."""

    code = "admin_cross_site"


class OverloadedError(SplitstreamError):
    status = 429
    type = "rate_limit_error"
    code = "overloaded"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TenantLimitError(OverloadedError):
    """A tenant is over one of its limits (`pipeline/limits.py`); `limit` names it (a metric label)."""

    code = "rate_limit_exceeded"

    def __init__(self, message: str, limit: str, retry_after: float) -> None:
        super().__init__(message, retry_after)
        self.limit = limit


class UpstreamError(SplitstreamError):
    """The runtime failed us. Raised only by `pipeline/forward.py` and `upstream/`."""

    status = 502
    type = "api_error"
    code = "upstream_error"


class BackendConnectError(UpstreamError):
    code = "backend_unreachable"
    reason = "connect"


class BackendTlsError(BackendConnectError):
    """The TLS handshake with an https:// backend failed (most often its certificate did not verify): a
    connect failure, but one an operator fixes in the rules or the certificate, not by restarting anything."""

    code = "backend_tls_error"
    reason = "tls"


class BackendStatusError(UpstreamError):
    code = "backend_error"
    reason = "status_5xx"


class BackendResetError(UpstreamError):
    code = "backend_reset"
    reason = "reset"


class BackendProtocolError(UpstreamError):
    code = "backend_protocol_error"
    reason = "protocol"


class BackendBodyTooLargeError(BackendProtocolError):
    code = "backend_body_too_large"


class BackendTimeoutError(UpstreamError):
    status = 504
    type = "timeout_error"
    code = "backend_timeout"
    reason = "timeout"


class BackendThrottledError(UpstreamError):
    """The runtime answered 429; its Retry-After is honoured (the backend is skipped until then)."""

    status = 429
    type = "rate_limit_error"
    code = "backend_rate_limited"
    reason = "status_429"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NoHealthyBackendError(UpstreamError):
    status = 503
    code = "no_healthy_backend"


class StoreUnavailableError(SplitstreamError):
    """A `Store` could not answer (Redis down, timed out, circuit open). Raised only by `store/`; every
    caller catches it and degrades (sticky split → hash fallback), so no client ever sees it."""

    code = "store_unavailable"


# The Anthropic Messages API's error `type` for an HTTP status (its SDK picks the exception class by status).
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                   503: "overloaded_error"}


def error_body(exc: SplitstreamError, endpoint: str = "") -> bytes:
    """The error object in the shape of the client's API — the one rendering of every error a client sees
    (JSON body or SSE event): OpenAI's `{"error": {message, type, code}}`, or on the Anthropic Messages
    endpoint (`endpoint == "messages"`) Anthropic's `{"type": "error", "error": {type, message}}`."""
    if endpoint == "messages":
        kind = ANTHROPIC_TYPES.get(exc.status) or ("api_error" if exc.status >= 500 else "invalid_request_error")
        return _dumps({"type": "error", "error": {"type": kind, "message": exc.message}}, exc)
    return _dumps({"error": {"message": exc.message, "type": exc.type, "code": exc.code}}, exc)


def sse_error_event(exc: SplitstreamError, endpoint: str = "") -> bytes:
    """The SSE event that ends a stream broken after bytes were sent, as the client's API words it: the
    openai SDK raises APIError on chat's `{"error": ...}`; the Responses API's typed `error` event; the
    anthropic SDK raises on Anthropic's `event: error`."""
    if endpoint == "responses":
        data = _dumps({"type": "error", "code": exc.code, "message": exc.message, "param": None}, exc)
    else:
        data = error_body(exc, endpoint)
    return b"event: error\ndata: " + data + b"\n\n"


def _dumps(body: dict[str, object], exc: SplitstreamError) -> bytes:
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError:  # a message quoting a client's undecodable bytes (lone surrogates)
        message = exc.message.encode("utf-8", "backslashreplace").decode("utf-8")
        return orjson.dumps(_replace_message(body, message))


def _replace_message(body: dict[str, object], message: str) -> dict[str, object]:
    inner = body.get("error")
    if isinstance(inner, dict):
        return {**body, "error": {**inner, "message": message}}
    return {**body, "message": message}


def _with_subclasses(root: type[SplitstreamError]) -> list[type[SplitstreamError]]:
    found, todo = [], [root]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


# What counts against a variant (its statistics, a rollout's evidence): failures its upstream is answerable
# for — unreachable, 5xx, reset, protocol, timeout, no healthy backend, a stream cut after its first byte.
# Never what the proxy refused on its own (400/401/403/404/413/429), a runtime's 429, or a client that left:
# a client must not be able to push errors into the variant it chose.
UPSTREAM_FAILURE_CODES = frozenset(
    cls.code for cls in _with_subclasses(UpstreamError) if not issubclass(cls, BackendThrottledError)
)
