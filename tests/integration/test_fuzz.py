"""Property-based fuzzing (Hypothesis) of a real splitstream process: generated bodies, headers, model names,
stream options and nesting. Whatever a client sends, the proxy answers: never a 500 (nor any 5xx, since the
runtimes behind it are healthy and answer everything they get), never a traceback in its log, an OpenAI-shaped
error for everything refused, and nothing left in flight afterwards.

One splitstream process per test (starting one is the slow part); Hypothesis drives its examples from a worker
thread with a blocking stdlib client (`http.client`), so the test's event loop keeps serving the simulated
runtimes meanwhile. Derandomized and without an example database: every run sends the same requests.
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import re
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.sim.runtime import SimConfig, SimRuntime
from tests.conftest import backend_url
from tests.integration.conftest import Served, ServedFactory

PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
# One model name per route of `fuzz_rules`; a generated suffix still matches the glob routes.
ROUTED = ("my-model", "split-", "user-", "key-", "cache-", "tenant-")
MAX_BODY = 16 * 1024  # server.max_body_bytes below
CONTEXT_TOKENS = 256  # the runtimes' "context window": a larger max_tokens is their 400, as vLLM's
SERVER_MAX_NESTING = 254  # proxy/pipeline/request.py MAX_NESTING: deeper bodies are the client's 400
ORJSON_MAX_DEPTH = 1024  # deeper than this orjson does not parse at all (also a 400)
CLIENT_TIMEOUT = 30.0  # seconds for one answer; a hang is a failure, not a stuck test
SETTLE_TIMEOUT = 10.0  # seconds for in-flight work (shadow copies) to drain after the last answer


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples, deadline=None, derandomize=True, database=None, print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                               HealthCheck.large_base_example],
    )


# ----------------------------------------------------------------------------------------------- the setup


def fuzz_rules(main: TestServer, second: TestServer) -> str:
    """Every kind of route a request can take: plain, split sticky by header / body user / API key (with a
    shadow), cached (shared, and per tenant)."""
    split = """
      variants:
        - {name: stable, pool: main, weight: 50}
        - {name: canary, pool: next, weight: 50}"""
    return f"""
server: {{max_body_bytes: {MAX_BODY}, read_timeout: 10s}}
backends:
  b0: {{url: "{backend_url(main)}", kind: vllm}}
  b1: {{url: "{backend_url(second)}", kind: vllm}}
pools:
  main: {{backends: [b0], model: "sim-model"}}
  next: {{backends: [b1], model: "sim-model"}}
routes:
  - name: plain
    match: {{model: "my-model"}}
    pool: main
  - name: split
    match: {{model: "split-*"}}
    split:
      sticky: {{by: "header:x-user", ttl: 1h}}{split}
    shadow: [{{pool: next, sample: 1.0}}]
  - name: by-user
    match: {{model: "user-*"}}
    split:
      sticky: {{by: "body:user", ttl: 1h}}{split}
  - name: by-key
    match: {{model: "key-*"}}
    split:
      sticky: {{by: api_key, ttl: 1h}}{split}
  - name: cached
    match: {{model: "cache-*"}}
    pool: main
    cache: {{ttl: 1m, shared: true}}
  - name: tenant
    match: {{model: "tenant-*"}}
    pool: next
    cache: {{ttl: 1m}}
"""


class Runtimes:
    """Two simulated runtimes, each refusing a max_tokens past its "context window" with a 400 as vLLM does
    (the simulator would otherwise try to generate a billion tokens for a fuzzed max_tokens); `largest` is
    the largest request body either received."""

    def __init__(self) -> None:
        self.largest = 0
        self.servers: list[TestServer] = []

    async def start(self, aiohttp_server: Any) -> Runtimes:
        for _ in range(2):
            runtime = SimRuntime(SimConfig(tokens_per_second=0.0, ttft_ms=0.0, default_max_tokens=8, max_batch=64))
            app = runtime.build_app()
            app.middlewares.append(self.context_window)
            self.servers.append(await aiohttp_server(app))
        return self

    @web.middleware
    async def context_window(self, request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        if request.method == "POST":
            raw = await request.read()
            self.largest = max(self.largest, len(raw))
            try:
                data = orjson.loads(raw)
            except orjson.JSONDecodeError:
                data = None
            if isinstance(data, dict):
                for key in ("max_tokens", "max_completion_tokens"):
                    value = data.get(key)
                    if type(value) is int and value > CONTEXT_TOKENS:
                        return web.json_response({"error": {
                            "message": f"{key} is larger than the context window", "type": "invalid_request_error",
                            "code": "context_length_exceeded"}}, status=400)
        response: web.StreamResponse = await handler(request)
        return response

    def rules(self) -> str:
        return fuzz_rules(*self.servers)


# ------------------------------------------------------------------------------------------------ the client

Header = tuple[str, bytes]


class Client:
    """Blocking HTTP/1.1 on a fresh connection per request (called from a worker thread). Each request gets
    an `X-Request-Id` unless the example sets one, so a traceback in the log names the request behind it."""

    def __init__(self, served: Served) -> None:
        self.port = served.port
        self.sent: dict[str, str] = {}  # request id -> what was sent (for failure messages)
        self.statuses: Counter[int] = Counter()  # the spread of answers (printed: pytest -rP shows it)

    def send(self, path: str, body: bytes, headers: Iterable[Header] = (), chunks: int = 0) -> tuple[int, bytes]:
        headers = list(headers)
        if not any(name.lower() == "x-request-id" for name, _ in headers):
            headers.append(("X-Request-Id", f"fuzz-{len(self.sent)}".encode()))
        request_id = next(v for n, v in headers if n.lower() == "x-request-id").decode("latin-1")
        self.sent[request_id] = f"POST {path} headers={headers!r} chunks={chunks} body={body[:300]!r}"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=CLIENT_TIMEOUT)
        try:
            own_host = any(name.lower() == "host" for name, _ in headers)
            conn.putrequest("POST", path, skip_host=own_host, skip_accept_encoding=True)
            for name, value in headers:
                conn.putheader(name, value)
            if chunks:  # Transfer-Encoding: chunked, the body cut into `chunks` pieces (no length announced)
                conn.putheader("Transfer-Encoding", "chunked")
                size = max(1, -(-len(body) // chunks))
                conn.endheaders([body[i:i + size] for i in range(0, len(body), size)], encode_chunked=True)
            else:
                conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body)
            response = conn.getresponse()
            self.statuses[response.status] += 1
            return response.status, response.read()
        finally:
            conn.close()

    def get(self, path: str) -> bytes:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=CLIENT_TIMEOUT)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            assert response.status == 200, response.status
            return response.read()
        finally:
            conn.close()


def assert_answer(status: int, body: bytes) -> None:
    """The invariants of every answer: no 5xx (the runtimes are healthy), an OpenAI error object for a refusal."""
    assert status != 500, f"internal error: {body[:500]!r}"
    assert 200 <= status < 500, f"unexpected status {status}: {body[:500]!r}"
    if status >= 400:
        document = json.loads(body)
        assert isinstance(document, dict) and isinstance(document.get("error"), dict), body[:500]
        error = document["error"]
        assert isinstance(error.get("message"), str) and isinstance(error.get("type"), str), body[:500]
        assert "code" in error, body[:500]


GAUGES = ("splitstream_upstream_inflight", "splitstream_upstream_predicted_load", "splitstream_queue_waiting")


def gauge_totals(client: Client) -> dict[str, float]:
    totals = dict.fromkeys(GAUGES, 0.0)
    for line in client.get("/metrics").decode().splitlines():
        name = re.split(r"[{ ]", line, maxsplit=1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


def assert_settled(client: Client, served: Served) -> None:
    """Nothing in flight, queued or predicted once the answers are in (shadow copies may still be finishing:
    polled, bounded), and no traceback or failed log write in the process log (with the requests behind them)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    totals = gauge_totals(client)
    while any(totals.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
        totals = gauge_totals(client)
    print(f"{sum(client.statuses.values())} requests, by status: {dict(sorted(client.statuses.items()))}")
    assert not any(totals.values()), f"left in flight after the fuzzing: {totals}"
    log = served.log
    if "Traceback" in log or "Logging error" in log:
        culprits = [what for request_id, what in client.sent.items() if f'request {request_id}"' in log]
        tracebacks = [line[:3000] for line in log.splitlines() if "Traceback" in line or "Logging error" in line]
        raise AssertionError(f"tracebacks in the log: {tracebacks[:3]}\nrequests: {culprits[:3]}")


def run_in_thread(test: Callable[[], None]) -> Any:
    """Run a Hypothesis test (blocking client) off the event loop, which keeps serving the runtimes."""
    return asyncio.to_thread(test)


# ------------------------------------------------------------------------------------------------ strategies

# Any text: control characters, astral planes, combining marks (lone surrogates come separately).
any_text = st.text(max_size=24)
surrogates = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=2)
json_leaves = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
               | st.floats(allow_nan=True, allow_infinity=True) | any_text)
json_values = st.recursive(
    json_leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=12,
)


def routed_name(prefix: str, suffix: str) -> str:
    return prefix if prefix == "my-model" else prefix + (suffix or "x")


model_names = st.one_of(
    st.builds(routed_name, st.sampled_from(ROUTED), st.text(st.characters(min_codepoint=0x21), max_size=12)),
    st.sampled_from(["", " ", "my-model ", "MY-MODEL", "my-model\x00", "split-*", "*", "my-model\n", "sim-model"]),
    any_text,
    st.builds(routed_name, st.sampled_from(ROUTED), st.text(min_size=250, max_size=270)),  # near 256
    st.text(min_size=257, max_size=2000),  # over the 256-character limit
    json_values,  # not a string at all
)
contents = any_text | st.none() | st.lists(
    st.fixed_dictionaries({"type": st.just("text"), "text": any_text | json_values}), max_size=3) | json_values
messages = st.one_of(
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]) | any_text,
                                    "content": contents}), min_size=1, max_size=3),
    json_values,
)
token_counts: st.SearchStrategy[Any] = st.one_of(
    st.integers(min_value=1, max_value=CONTEXT_TOKENS), st.integers(min_value=-(2**64), max_value=2**66),
    st.floats(allow_nan=False), st.sampled_from([0, -1, 1.5, "10", 2**63, 2**64 - 1, 10**30, True, None, []]),
)
streams = st.one_of(st.booleans(), st.sampled_from(["true", 1, 0, None, "stream"]), json_values)
stream_options = st.one_of(
    st.fixed_dictionaries({"include_usage": st.booleans() | json_values}),
    st.fixed_dictionaries({}, optional={"include_usage": st.booleans(), "extra": json_values}),
    json_values,
)
routed_models = st.builds(routed_name, st.sampled_from(ROUTED), st.sampled_from(["", "a", "b"]))
DELETE = object()  # an override that removes the field
fields = {  # each field of a request, fuzzed
    "model": model_names,
    "messages": messages,
    "prompt": any_text | st.lists(any_text, min_size=1, max_size=3) | json_values,
    "input": any_text | st.lists(any_text, min_size=1, max_size=3) | json_values,
    "stream": streams,
    "stream_options": stream_options,
    "max_tokens": token_counts,
    "max_completion_tokens": token_counts,
    "temperature": st.sampled_from([0, 0.0, 1, False, "0", None]) | json_values,
    "n": st.sampled_from([1, 2, 1.0, "1", None, 0]) | json_values,
    "user": any_text | surrogates | json_values,
    "encoding_format": st.sampled_from(["float", "base64", "junk"]),
    "request_id": any_text,  # /v1/feedback's fields, on the one path that reads them
    "score": json_values,
}


def with_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    body = {**base, **overrides}
    return {key: value for key, value in body.items() if value is not DELETE}


# Mostly well-formed: a request every runtime would serve (chat, completions and embeddings read their own
# fields and ignore the others'), with a few fields replaced by generated values or removed.
base_bodies = st.fixed_dictionaries({
    "model": routed_models,
    "messages": st.just([{"role": "user", "content": "hi"}]),
    "prompt": st.just("hi"),
    "input": st.just("hi"),
    "max_tokens": st.integers(min_value=1, max_value=8),
    "stream": st.booleans(),
    "temperature": st.sampled_from([0, 1]),
}, optional={"user": st.sampled_from(["alice", "bob"])})


def some_of(choices: dict[str, st.SearchStrategy[Any]], most: int, extra: Any = None) -> st.SearchStrategy[dict[str, Any]]:
    """Up to `most` of the keys of `choices`, each with a value from its strategy (or `extra`, when given)."""
    def values(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
        return st.fixed_dictionaries({k: choices[k] if extra is None else choices[k] | st.just(extra) for k in keys})
    return st.lists(st.sampled_from(sorted(choices)), max_size=most, unique=True).flatmap(values)


mostly_valid_bodies = st.builds(with_overrides, base_bodies, some_of(fields, 2, extra=DELETE))
# Anything goes: each field generated (and the model always there, the rest may be absent).
chat_bodies = st.fixed_dictionaries({"model": model_names},
                                    optional={key: s for key, s in fields.items() if key != "model"})
bodies = st.one_of(mostly_valid_bodies, mostly_valid_bodies, mostly_valid_bodies, chat_bodies, json_values)


def encode(value: Any, ascii_only: bool) -> bytes:
    """JSON as a client library might write it; NaN/Infinity tokens and lone surrogates (as escapes, or as
    the ill-formed UTF-8 `surrogatepass` makes of them) included."""
    return json.dumps(value, ensure_ascii=ascii_only, allow_nan=True).encode("utf-8", "surrogatepass")


# A few well-formed chat bodies that some raw-bytes strategies cut or corrupt.
GOOD = [
    {"model": "my-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    {"model": "split-a", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    {"model": "cache-a", "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "stream": True},
]
good_bodies = st.sampled_from([orjson.dumps(b) for b in GOOD])


def splice(body: bytes, junk: bytes) -> bytes:
    """`junk` inserted right after the model name's first character (inside the string)."""
    at = body.index(b'"model":"') + len(b'"model":"') + 1
    return body[:at] + junk + body[at:]


raw_bodies = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda body, cut: body[:cut], good_bodies, st.integers(min_value=0, max_value=120)),  # truncated
    st.builds(splice, good_bodies, st.binary(min_size=1, max_size=8)),  # often ill-formed UTF-8
    st.builds(lambda body, prefix: prefix + body, good_bodies,
              st.sampled_from([b"\xef\xbb\xbf", b"\xfe\xff", b"\x00", b" \t\r\n" * 50])),  # BOMs, NUL, blanks
    st.builds(lambda body, tail: body + tail, good_bodies, st.sampled_from([b"x", b"}", b"{}", b"\x00", b"\xff"])),
    st.sampled_from([b"null", b"[]", b"1", b'"x"', b"{}", b'{"model":"my-model","model":"x","messages":[]}',
                     b'{"model":"my-model",}', b"{'model':'my-model'}", b'{"model":"my-model"}' * 2]),
)


def nested(depth: int, kind: str, model: str, stream: bool) -> bytes:
    """A chat body whose deepest container is `depth` levels down (the body object itself is level 1), built
    as bytes (no recursion anywhere); `unbalanced` never closes, `brackets` only looks deep (inside a string)."""
    k = depth - 1
    head = b'{"model":' + orjson.dumps(model) + (b',"stream":true' if stream else b"")
    head += b',"messages":[{"role":"user","content":"hi"}]'
    if kind == "list":
        return head + b',"x":' + b"[" * k + b"]" * k + b"}"
    if kind == "dict":
        return head + b',"stream_options":' + b'{"a":' * (k - 1) + b"{}" + b"}" * (k - 1) + b"}"
    if kind == "mixed":
        opening = b"".join(b'[{"a":' if i % 2 == 0 else b"" for i in range(k))
        closing = b"".join(b"}]" if i % 2 == 0 else b"" for i in range(k))
        return head + b',"x":' + opening + b"1" + closing + b"}"
    if kind == "content":  # in the chat message's content parts (what a runtime reads)
        return (b'{"model":' + orjson.dumps(model) + b',"messages":[{"role":"user","content":'
                + b"[" * (depth - 3) + b"]" * (depth - 3) + b"}]}")
    if kind == "unbalanced":
        return head + b',"x":' + b"[" * k
    assert kind == "brackets"
    return head + b',"x":"' + b"[{" * depth + b'"}'


def nesting_depth(kind: str, depth: int) -> int:
    """How deep the JSON of `nested(depth, kind, ...)` really is (`mixed` nests two levels per step)."""
    return 1 + 2 * (depth // 2) if kind == "mixed" else depth


NESTING_KINDS = ("list", "dict", "mixed", "content", "unbalanced", "brackets")
depths = st.one_of(
    st.integers(min_value=200, max_value=1100),
    st.sampled_from([SERVER_MAX_NESTING - 1, SERVER_MAX_NESTING, SERVER_MAX_NESTING + 1, 300,
                     ORJSON_MAX_DEPTH - 1, ORJSON_MAX_DEPTH, ORJSON_MAX_DEPTH + 1, ORJSON_MAX_DEPTH + 2]),
)

HEADER_VALUE_BYTES = [0x09, *range(0x20, 0x7F), *range(0x80, 0x100)]  # what HTTP allows in a field value
header_values = st.one_of(
    st.lists(st.sampled_from(HEADER_VALUE_BYTES), max_size=40).map(bytes),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(str.encode),
    st.lists(st.sampled_from(HEADER_VALUE_BYTES), min_size=200, max_size=4000).map(bytes),
)
TOKEN = r"\A[A-Za-z0-9!#$%&'*+.^_`|~-]{1,24}\Z"


def one_of_or_junk(*known: str) -> st.SearchStrategy[bytes]:
    return st.sampled_from([k.encode() for k in known]) | header_values


header_choices = {
    "Content-Type": one_of_or_junk("application/json", "application/json; charset=utf-8", "APPLICATION/JSON",
                                   "text/plain", "", "multipart/form-data; boundary=x", "application/jsonx",
                                   "application/x-www-form-urlencoded"),
    "x-user": one_of_or_junk("alice", "bob", "", " "),
    "x-splitstream-cache": one_of_or_junk("force", "FORCE", "bypass", ""),
    "x-splitstream-route": header_values,
    "x-splitstream-variant": one_of_or_junk("canary", "stable"),
    "X-Splitstream-Admin": one_of_or_junk("1"),
    "Cache-Control": one_of_or_junk("no-cache", "no-store", "max-age=0", "NO-CACHE, private", "only-if-cached"),
    "X-Request-Id": one_of_or_junk("fuzz-fixed-id", "x" * 200, "a b", ""),
    "Accept": one_of_or_junk("text/event-stream", "application/json", "*/*"),
    "Accept-Encoding": one_of_or_junk("gzip", "br", "identity;q=0", "*"),
    "Content-Encoding": one_of_or_junk("identity"),
    "Expect": one_of_or_junk("100-continue"),
    "Connection": one_of_or_junk("close", "keep-alive"),
    "Host": header_values,
    "Cookie": one_of_or_junk("splitstream_ui=1.abc"),
}

# The client keys are on: mostly (4 in 5) a valid key, so that the request reaches its route.
authorizations = st.integers(min_value=0, max_value=4).flatmap(
    lambda draw: st.sampled_from([b"Bearer good-key", b"Bearer other key", b"bearer  good-key "]) if draw
    else one_of_or_junk("Bearer ", "Bearer", "Basic Z29vZDprZXk=", "Bearer good-key extra")
    | header_values.map(lambda token: b"Bearer " + token))
header_sets = st.builds(lambda auth, chosen: sorted([("Authorization", auth), *chosen.items()]),
                        authorizations, some_of(header_choices, 4))
extra_headers = st.lists(st.tuples(st.from_regex(TOKEN), header_values), max_size=3)


# --------------------------------------------------------------------------------------------------- tests


async def test_generated_json_bodies_are_answered_or_refused_cleanly(
    aiohttp_server: Any, served: ServedFactory,
) -> None:
    backends = await Runtimes().start(aiohttp_server)
    s = await served(backends.rules())
    client = Client(s)

    @fuzz_settings(120)
    @given(path=st.sampled_from([*PATHS, *PATHS, "/v1/feedback"]), body=bodies,
           ascii_only=st.booleans(), chunks=st.sampled_from([0, 0, 0, 1, 3]))
    @example(path="/v1/chat/completions", body={"model": "my-model", "messages": [{"role": "user", "content": "hi"}]},
             ascii_only=True, chunks=0)  # the positive control: a plain request works (200)
    def fuzz(path: str, body: Any, ascii_only: bool, chunks: int) -> None:
        status, answer = client.send(path, encode(body, ascii_only), [("Content-Type", b"application/json")],
                                     chunks=chunks)
        assert_answer(status, answer)

    await run_in_thread(fuzz)
    await run_in_thread(lambda: assert_settled(client, s))


async def test_raw_and_deeply_nested_bodies_are_refused_as_the_clients_error(
    aiohttp_server: Any, served: ServedFactory,
) -> None:
    backends = await Runtimes().start(aiohttp_server)
    s = await served(backends.rules())
    client = Client(s)

    @fuzz_settings(50)
    @given(path=st.sampled_from(PATHS), body=raw_bodies, chunks=st.sampled_from([0, 0, 2]))
    def raw(path: str, body: bytes, chunks: int) -> None:
        status, answer = client.send(path, body, [("Content-Type", b"application/json")], chunks=chunks)
        assert_answer(status, answer)

    @fuzz_settings(50)
    @given(depth=depths, kind=st.sampled_from(NESTING_KINDS), model=st.sampled_from(["my-model", "split-a"]),
           stream=st.booleans(), chunks=st.sampled_from([0, 0, 4]))
    @example(depth=300, kind="list", model="my-model", stream=False, chunks=0)  # the case: a 400
    @example(depth=SERVER_MAX_NESTING, kind="list", model="my-model", stream=True, chunks=0)  # the limit: served
    def deep(depth: int, kind: str, model: str, stream: bool, chunks: int) -> None:
        status, answer = client.send("/v1/chat/completions", nested(depth, kind, model, stream),
                                     [("Content-Type", b"application/json")], chunks=chunks)
        assert_answer(status, answer)
        real = nesting_depth(kind, depth)
        if kind == "brackets" or (kind != "unbalanced" and real <= SERVER_MAX_NESTING):
            assert status == 200, (real, answer[:300])  # forwarded, re-serialised (model renamed) and served
        else:
            assert status == 400, (real, answer[:300])
            assert json.loads(answer)["error"]["type"] == "invalid_request_error"

    await run_in_thread(raw)
    await run_in_thread(deep)
    await run_in_thread(lambda: assert_settled(client, s))


async def test_generated_headers_are_answered_or_refused_cleanly(aiohttp_server: Any, served: ServedFactory) -> None:
    backends = await Runtimes().start(aiohttp_server)
    # With client keys on: Authorization decides between 401 and the route, whose split may key on it.
    s = await served(backends.rules(), env={"SPLITSTREAM_API_KEYS": "good-key,other key"})
    client = Client(s)

    @fuzz_settings(80)
    @given(path=st.sampled_from(PATHS), headers=header_sets, extra=extra_headers,
           model=st.builds(routed_name, st.sampled_from(ROUTED), st.sampled_from(["", "a"])),
           stream=st.booleans(), temperature=st.sampled_from([0, 1]), chunks=st.sampled_from([0, 0, 2]),
           encoding=st.sampled_from([None, None, "gzip", "deflate"]), padding=st.sampled_from([0, 0, 4 * MAX_BODY]))
    def fuzz(path: str, headers: list[Header], extra: list[Header], model: str, stream: bool, temperature: int,
             chunks: int, encoding: str | None, padding: int) -> None:
        body = orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "prompt": "hi",
                             "input": "hi", "stream": stream, "temperature": temperature, "max_tokens": 4,
                             "padding": "a" * padding})
        sent = body
        if encoding is not None:  # compressed on the wire: the size limit is the decoded body's
            sent = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
            headers = [(n, v) for n, v in headers if n.lower() != "content-encoding"]
            headers.append(("Content-Encoding", encoding.encode()))
        status, answer = client.send(path, sent, headers + extra, chunks=chunks)
        assert_answer(status, answer)
        if len(body) > MAX_BODY:
            assert status >= 400, f"a {len(body)}-byte body ({len(sent)} on the wire) was served: {answer[:200]!r}"

    await run_in_thread(fuzz)
    await run_in_thread(lambda: assert_settled(client, s))
    assert backends.largest <= MAX_BODY + 64, f"a runtime received a {backends.largest}-byte body"


# ------------------------------------------------------------------------------- regressions found by fuzzing
# Each test below pins one bug the fuzzing above found (issue 15); each FAILS until that bug is fixed in proxy/.
# A header's bytes reach the app as text decoded with `surrogateescape` (aiohttp), so bytes that are not UTF-8
# become lone surrogates: `.encode()`, orjson and the JSON log formatter all raise on them.

CHAT = orjson.dumps({"model": "my-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
JSON_TYPE: Header = ("Content-Type", b"application/json")


def chat(model: str) -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})


async def ask(s: Served, body: bytes, headers: list[Header], path: str = "/v1/chat/completions") -> tuple[int, bytes]:
    return await asyncio.to_thread(Client(s).send, path, body, headers)


async def exchange(s: Served, request: bytes) -> tuple[bytes, bytes]:
    """Raw bytes in (with `Connection: close`), (status line and headers, body) out."""
    reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), CLIENT_TIMEOUT)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


async def assert_clean_log(s: Served) -> None:
    """Stop the process (so its log is complete): no traceback, no failed log write."""
    await s.stop()
    assert "Traceback" not in s.log and "Logging error" not in s.log, s.log[-3000:]


async def test_a_sticky_subject_header_that_is_not_utf8_is_no_500(aiohttp_server: Any, served: ServedFactory) -> None:
    # Found by fuzzing (fixed): proxy/pipeline/split.py subject_digest() does `subject.encode()`: `x-user: \xff\xfe` on a route with
    # `sticky: {by: "header:x-user"}` raises UnicodeEncodeError (assign_variant) -> 500 and a traceback.
    s = await served((await Runtimes().start(aiohttp_server)).rules())
    status, body = await ask(s, chat("split-a"), [JSON_TYPE, ("x-user", b"\xff\xfe")])
    assert_answer(status, body)
    await assert_clean_log(s)


async def test_a_bearer_key_that_is_not_utf8_is_no_500(aiohttp_server: Any, served: ServedFactory) -> None:
    # Found by fuzzing (fixed): `Authorization: Bearer \xff\xfe` -> 500 and a traceback wherever the key is hashed:
    # proxy/auth.py hash_api_key() (`sticky: {by: api_key}`, via assignment.find_subject; and the client-key
    # check when SPLITSTREAM_API_KEYS is set) and proxy/pipeline/cache_policy.py tenant_of() (a per-tenant cache).
    backends = await Runtimes().start(aiohttp_server)
    key = ("Authorization", b"Bearer \xff\xfe")
    open_to_all = await served(backends.rules())
    for model in ("key-a", "tenant-a"):
        status, body = await ask(open_to_all, chat(model), [JSON_TYPE, key])
        assert_answer(status, body)
    await assert_clean_log(open_to_all)
    with_keys = await served(backends.rules(), env={"SPLITSTREAM_API_KEYS": "good-key"})
    status, body = await ask(with_keys, chat("my-model"), [JSON_TYPE, key])
    assert_answer(status, body)
    assert status == 401, body  # not one of the keys
    await assert_clean_log(with_keys)


async def test_a_content_type_that_is_not_utf8_gets_an_openai_400(aiohttp_server: Any, served: ServedFactory) -> None:
    # Found by fuzzing: the header quoted in ContentTypeError's message arrives with lone surrogates, which
    # orjson refuses; error_body() and the JSON log formatter used to fail (a text/plain 500, "Logging error").
    s = await served((await Runtimes().start(aiohttp_server)).rules())
    status, body = await ask(s, CHAT, [("Content-Type", b"text/\xff")])
    assert_answer(status, body)
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_content_type", body
    await assert_clean_log(s)


async def test_a_body_that_does_not_decode_is_the_clients_4xx(aiohttp_server: Any, served: ServedFactory) -> None:
    # Found by fuzzing: `Content-Encoding: gzip` (or deflate) over a body that is not compressed used to be a
    # 500 logged with tracebacks. Compressed bodies are refused unread (415), and draining the bogus body
    # after the answer logs no traceback.
    s = await served((await Runtimes().start(aiohttp_server)).rules())
    for encoding in (b"gzip", b"deflate"):
        status, body = await ask(s, CHAT, [JSON_TYPE, ("Content-Encoding", encoding)])
        assert_answer(status, body)
        assert status == 415 and json.loads(body)["error"]["code"] == "unsupported_content_encoding", body
    await assert_clean_log(s)


async def test_a_compressed_body_is_held_to_max_body_bytes(aiohttp_server: Any, served: ServedFactory) -> None:
    # Found by fuzzing: Content-Length (the compressed size) was checked against server.max_body_bytes and the
    # body then inflated with no limit but aiohttp's 1 GiB: a 10 kB gzip body of 10 MB passed a 16 KiB limit.
    # Compressed bodies are now refused unread (no runtime takes them anyway).
    backends = await Runtimes().start(aiohttp_server)
    s = await served(backends.rules())
    large = orjson.dumps({"model": "my-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                          "padding": "a" * 10_000_000})
    status, body = await ask(s, gzip.compress(large), [JSON_TYPE, ("Content-Encoding", b"gzip")])
    assert_answer(status, body)
    assert status == 415, body[:300]
    assert backends.largest == 0  # never forwarded


async def test_an_unknown_expect_gets_an_openai_error(aiohttp_server: Any, served: ServedFactory) -> None:
    # Found by fuzzing (fixed): aiohttp answers `Expect:` itself, before the middleware: anything but 100-continue is a text/plain
    # 417 "Unknown Expect: foo"; with non-UTF-8 bytes the 417 cannot even be built (UnicodeEncodeError in
    # web_urldispatcher._default_expect_handler) -> text/plain 500 and a traceback. (The routes' expect_handler
    # is the place to answer with an OpenAI error.)
    s = await served((await Runtimes().start(aiohttp_server)).rules())
    for expect in (b"foo", b"\x80"):
        status, body = await ask(s, CHAT, [JSON_TYPE, ("Expect", expect)])
        assert_answer(status, body)
    await assert_clean_log(s)


async def test_a_malformed_request_head_gets_an_openai_400_and_no_traceback(
    aiohttp_server: Any, served: ServedFactory,
) -> None:
    # Found by fuzzing (fixed): requests aiohttp's parser refuses (a control character in a header value, a non-ASCII byte in the
    # target, a header over 8190 bytes, an encoding aiohttp cannot decode) get aiohttp's own text/plain 400 (over
    # HTTP/1.0, echoing the offending bytes), and each is logged at error level with a traceback
    # ("Error handling request from ..."): any client can fill the error log. (The connection handler of
    # proxy/pipeline/connections.py can override handle_error.)
    s = await served((await Runtimes().start(aiohttp_server)).rules())
    heads = [
        b"POST /v1/chat/completions HTTP/1.1\r\nX-Junk: a\x01b\r\n",
        b"POST /v1/\xff HTTP/1.1\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nX-Long: " + b"a" * 9000 + b"\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Encoding: br\r\n",
    ]
    for head in heads:
        request = head + b"Host: x\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
        status_line, body = await exchange(s, request % len(CHAT) + CHAT)
        assert status_line.split(b" ")[1].startswith(b"4"), (head[:60], status_line)
        assert_answer(int(status_line.split()[1]), body)
    await assert_clean_log(s)
