"""Server-sent events as they pass through: find the usage chunk, drop it if the client did not ask for it.

Sans-I/O (h11 style): bytes in, bytes out, no sockets. The relay never re-frames: in pass-through mode it
returns each network chunk exactly as received; when it must strip the usage chunk it returns whole events
and holds back only an incomplete trailing event (runtimes flush whole events, so that is normally
nothing). Usage is read from the one event that carries it, so the JSON of token chunks is never parsed.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.errors import BackendProtocolError
from proxy.observe.record import RequestRecord

USAGE_KEY = b'"usage"'
DEFAULT_MAX_EVENT_BYTES = 1024 * 1024  # server.max_event_bytes
# How each endpoint's stream ends when the runtime finished it (its last event): one that ends otherwise was
# cut. Chat and completions end with `data: [DONE]`; the Responses API with `response.completed` (or the
# runtime's own verdict, `incomplete` / `failed`); the Messages API with `message_stop`.
TERMINAL_EVENTS: dict[str, tuple[bytes, ...]] = {
    "chat": (b"[DONE]",),
    "completions": (b"[DONE]",),
    "responses": (b"response.completed", b"response.incomplete", b"response.failed"),
    "messages": (b"message_stop",),
}
TERMINAL_SCAN = 128  # a terminal marker is an event's name or its first field, or `[DONE]`: near an edge
WHITESPACE = b" \t\r\n"

TIMINGS_KEY = b'"timings"'  # llama.cpp's own account of the request: prefill and decode time, cached tokens


class Usage:
    """What a runtime reported about one request: token counts and, where it says, its own timings.

    `prompt` is every input token, cached ones included (OpenAI's `prompt_tokens`; on the Messages API
    `input_tokens` + `cache_read_input_tokens` + `cache_creation_input_tokens`, since Anthropic counts cache reads
    apart). `cached`: prompt tokens the runtime's prefix cache held (vLLM's `prompt_tokens_details.cached_tokens`,
    Responses' `input_tokens_details`, Anthropic's `cache_read_input_tokens`, llama.cpp's `timings.cache_n`).
    `prefill_ms` / `decode_ms`: llama.cpp's `timings.prompt_ms` / `predicted_ms`, the runtime's own clock, so time
    spent in its queue is not mistaken for prefill. None: not said."""

    __slots__ = ("prompt", "completion", "cached", "prefill_ms", "decode_ms")

    def __init__(self, prompt: int | None, completion: int | None, cached: int | None = None,
                 prefill_ms: float | None = None, decode_ms: float | None = None) -> None:
        self.prompt = prompt
        self.completion = completion
        self.cached = cached
        self.prefill_ms = prefill_ms
        self.decode_ms = decode_ms

    def merged(self, later: Usage) -> Usage:
        """This usage updated by one reported later in the same stream (a count said again replaces)."""
        return Usage(
            self.prompt if later.prompt is None else later.prompt,
            self.completion if later.completion is None else later.completion,
            self.cached if later.cached is None else later.cached,
            self.prefill_ms if later.prefill_ms is None else later.prefill_ms,
            self.decode_ms if later.decode_ms is None else later.decode_ms,
        )

    @property
    def tokens(self) -> tuple[int | None, int | None]:
        return self.prompt, self.completion

    def apply_to(self, record: RequestRecord) -> None:
        record.prompt_tokens, record.completion_tokens = self.prompt, self.completion
        record.cached_tokens = self.cached
        record.runtime_prefill_ms, record.runtime_decode_ms = self.prefill_ms, self.decode_ms


def find_usage_object(data: bytes) -> Usage | None:
    """The usage of the last `"usage": {...}` in a JSON text (and llama.cpp's `"timings"` beside it), else None.

    Scans from the end: the usage object of a completion comes last, and an embeddings body can be
    megabytes of floats that are not worth parsing.
    """
    usage = _last_object(data, USAGE_KEY)
    if usage is None:
        return None
    cached = _cached_of(usage)
    input_tokens = _int(usage.get("prompt_tokens"))
    if input_tokens is None and (input_tokens := _int(usage.get("input_tokens"))) is not None and "cache_read_input_tokens" in usage:
        input_tokens += (cached or 0) + (_int(usage.get("cache_creation_input_tokens")) or 0)
    found = Usage(input_tokens, _int(usage.get("completion_tokens", usage.get("output_tokens"))), cached)
    if TIMINGS_KEY in data:
        timings = _last_object(data, TIMINGS_KEY)
        if timings is not None:
            found.prefill_ms, found.decode_ms = _ms(timings.get("prompt_ms")), _ms(timings.get("predicted_ms"))
            if found.cached is None:
                found.cached = _int(timings.get("cache_n"))
    return found


def _last_object(data: bytes, key: bytes) -> dict[str, Any] | None:
    """The JSON object that is the value of the last `key` (a quoted name) in `data`, if it parses."""
    at = data.rfind(key)
    while at >= 0:
        start = at + len(key)
        while start < len(data) and data[start] in b" \t\r\n:":
            start += 1
        if start < len(data) and data[start] == 0x7B:  # '{'
            end = _matching_brace(data, start)
            if end > 0:
                try:
                    value = orjson.loads(data[start:end])
                except orjson.JSONDecodeError:
                    return None
                return value if isinstance(value, dict) else None
            return None
        at = data.rfind(key, 0, at)
    return None


def _cached_of(usage: dict[str, Any]) -> int | None:
    """Prompt tokens served from the runtime's prefix cache, in whichever API's words the usage uses."""
    for details in ("prompt_tokens_details", "input_tokens_details"):
        inner = usage.get(details)
        if isinstance(inner, dict) and (cached := _int(inner.get("cached_tokens"))) is not None:
            return cached
    return _int(usage.get("cache_read_input_tokens"))


def _ms(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 else None


def _matching_brace(data: bytes, start: int) -> int:
    """Index after the '}' closing the '{' at `start`, or -1. Usage objects hold no strings with braces.

    Jumps from '}' to '}' with bytes.find (C speed) instead of walking bytes in Python.
    """
    limit = min(len(data), start + 4096)
    pos = start
    while True:
        end = data.find(b"}", pos, limit)
        if end < 0:
            return -1
        if data.count(b"{", start, end) == data.count(b"}", start, end) + 1:
            return end + 1
        pos = end + 1


def _int(value: object) -> int | None:
    return value if type(value) is int else None


def ended_normally(events: bytes, endpoint: str) -> bool:
    """Whether the last event of `events` is how `endpoint`'s streams end (True for endpoints with no such
    rule). Near-edge scans only: the terminal event of the Responses API carries the whole response."""
    markers = TERMINAL_EVENTS.get(endpoint)
    if markers is None:
        return True
    end = len(events)
    while end and events[end - 1] in WHITESPACE:
        end -= 1
    start = max(events.rfind(b"\n\n", 0, end), events.rfind(b"\r\n\r\n", 0, end)) + 1
    return any(events.find(marker, start, start + TERMINAL_SCAN) >= 0
               or events.find(marker, max(start, end - TERMINAL_SCAN), end) >= 0 for marker in markers)


def _last_event_end(data: bytes | bytearray, start: int = 0) -> int:
    """Index just after the last complete event (blank line: LF LF or CRLF CRLF) at or after `start`, or -1."""
    lf = data.rfind(b"\n\n", start)
    crlf = data.rfind(b"\r\n\r\n", start)
    if lf < 0 and crlf < 0:
        return -1
    return max(lf + 2 if lf >= 0 else -1, crlf + 4 if crlf >= 0 else -1)


def is_usage_event(event: bytes) -> bool:
    """An event whose usage is an object (the final usage chunk), not `"usage": null` of token chunks."""
    at = event.find(USAGE_KEY)
    while at >= 0:
        rest = event[at + len(USAGE_KEY) : at + len(USAGE_KEY) + 8].lstrip(b" \t:")
        if rest.startswith(b"{"):
            return True
        at = event.find(USAGE_KEY, at + 1)
    return False


class SseRelay:
    """Feeds upstream body chunks through; records usage; strips the usage event when asked to.

    Only an incomplete trailing event is held (in a bytearray, appended to in place), and only the bytes
    that are new are searched for an event's end: a runtime that sends one enormous event costs linear
    time, and more than `max_event_bytes` of it raises `BackendProtocolError` (the relay ends the stream
    with an error event). `saw_done` tells, once finished, whether the stream's last event was how `endpoint`'s
    streams end (`TERMINAL_EVENTS`; looked at only when asked: the relay asks when a body ended by EOF). Usage reported in several events (the Messages API: input tokens in `message_start`,
    output tokens in `message_delta`) is merged, a later count replacing an earlier one.
    """

    __slots__ = ("strip_usage", "max_event_bytes", "usage", "endpoint", "_tail", "_last", "_end")

    def __init__(self, strip_usage: bool, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
                 endpoint: str = "chat") -> None:
        self.strip_usage = strip_usage
        self.max_event_bytes = max_event_bytes
        self.endpoint = endpoint
        self.usage: Usage | None = None
        self._tail = bytearray()
        self._last = b""  # the last complete events seen (a reference, not a copy)
        self._end: bytes | None = None  # set by finish(): the events the stream ended with

    @property
    def saw_done(self) -> bool:
        return self._end is not None and ended_normally(self._end, self.endpoint)

    def feed(self, chunk: bytes) -> bytes:
        """Bytes to send to the client now (possibly empty)."""
        tail = self._tail
        if tail:
            start = max(0, len(tail) - 3)  # a blank line may straddle what was held and the new chunk
            tail += chunk
            end = _last_event_end(tail, start)
            if end >= 0:
                view = memoryview(tail)
                complete = bytes(view[:end])
                self._tail = bytearray(view[end:])
                view.release()
        else:
            end = _last_event_end(chunk)
            if end >= 0:
                complete = chunk[:end]  # the whole chunk (no copy) when the runtime flushed whole events
                if end < len(chunk):
                    tail += chunk[end:]
        if end < 0:
            if not tail:
                tail += chunk
            if len(tail) > self.max_event_bytes:
                raise BackendProtocolError(f"backend sent an event longer than {self.max_event_bytes} bytes")
            return b"" if self.strip_usage else chunk
        self._last = complete
        if USAGE_KEY in complete:
            complete = self._take_usage(complete)
        return complete if self.strip_usage else chunk

    def finish(self) -> bytes:
        """What is left at the end of the upstream body (an unterminated last event)."""
        tail, self._tail = bytes(self._tail), bytearray()
        self._end = tail if tail.strip() else self._last
        if tail and USAGE_KEY in tail:
            kept = self._take_usage(tail)
            return kept if self.strip_usage else b""
        return tail if self.strip_usage else b""

    def _take_usage(self, complete: bytes) -> bytes:
        events = complete.split(b"\n\n") if b"\r\n\r\n" not in complete else complete.split(b"\r\n\r\n")
        sep = b"\n\n" if b"\r\n\r\n" not in complete else b"\r\n\r\n"
        kept = []
        for event in events:
            if event and is_usage_event(event):
                self._merge(find_usage_object(event))
                if self.strip_usage:
                    continue
            kept.append(event)
        return sep.join(kept)

    def _merge(self, found: Usage | None) -> None:
        if found is not None:
            self.usage = found if self.usage is None else self.usage.merged(found)
