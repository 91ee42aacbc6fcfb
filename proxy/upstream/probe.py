"""Talking to a runtime outside of client traffic: health probes and its own load metrics, per backend kind.

vLLM, llama.cpp and TGI answer `/health` (llama.cpp says 503 while the model loads); Ollama answers `/`;
an OpenAI-compatible server is asked for `/v1/models`, also the fallback when `/health` is 404. Load comes
from the runtime's Prometheus `/metrics` (vLLM, llama.cpp, TGI), parsed by `prometheus_client`. Each GET
is an `UpstreamConnection` of its own, never one from the shared pool, so a probe never competes with or
poisons request connections. Called by `upstream/health.py`, the rollout controller and /readyz.
"""

from __future__ import annotations

import asyncio
import enum

from prometheus_client.parser import text_string_to_metric_families

from proxy.config.model import Backend
from proxy.errors import BackendTimeoutError, UpstreamError
from proxy.upstream.connection import UpstreamConnection, open_connection

PROBE_PATHS = {
    "vllm": "/health",
    "llamacpp": "/health",
    "tgi": "/health",
    "ollama": "/",
    "openai": "/v1/models",
}
FALLBACK_PATH = "/v1/models"
PROBE_TIMEOUT = 1.0
MAX_METRICS_BYTES = 4 * 1024 * 1024

# Per kind: (metric names whose values sum to "waiting", to "running", KV-cache usage 0..1).
RUNTIME_METRICS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "vllm": (("vllm:num_requests_waiting",), ("vllm:num_requests_running",),
             ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")),
    "llamacpp": (("llamacpp:requests_deferred",), ("llamacpp:requests_processing",), ()),
    "tgi": (("tgi_queue_size",), ("tgi_batch_current_size",), ()),
}


class Probe(enum.Enum):
    """A health probe's outcome. A timeout is told apart from a failure because a loaded runtime answers
    `/health` late while it serves fine: the ejection policy weighs the two differently."""

    OK = "ok"
    FAILED = "failed"  # refused, broken, or a non-2xx answer: the runtime (or its absence) said so
    TIMED_OUT = "timed_out"  # no answer within the timeout: busy or dead, the traffic decides


async def http_get(backend: Backend, path: str, timeout: float, max_bytes: int = 65536) -> tuple[int, bytes]:
    """(status, body) of one GET with Connection: close, the body cut at `max_bytes`; (0, b'') when it could
    not be done within `timeout` seconds (connect included) or the backend broke the exchange."""
    try:
        return await _get(backend, path, timeout, max_bytes)
    except (UpstreamError, OSError):
        return 0, b""


async def _get(backend: Backend, path: str, timeout: float, max_bytes: int) -> tuple[int, bytes]:
    """`http_get` that raises instead: `BackendTimeoutError` past the deadline, other `UpstreamError`s or
    `OSError` when the exchange broke."""
    auth = f"Authorization: Bearer {backend.api_key}\r\n" if backend.api_key else ""
    request = (
        f"GET {backend.base_path}{path} HTTP/1.1\r\nHost: {backend.authority}\r\n{auth}"
        "Connection: close\r\n\r\n"
    ).encode("latin-1")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    conn: UpstreamConnection | None = None
    try:
        conn = await open_connection(loop, backend, timeout)
        conn.start(request)
        await conn.read_head(deadline, "total")
        return conn.status, await _read_body(conn, deadline, max_bytes)
    finally:
        if conn is not None:
            conn.abort()  # Connection: close anyway; abort also stops a body we chose not to read to its end


async def _read_body(conn: UpstreamConnection, deadline: float, max_bytes: int) -> bytes:
    """The body's first `max_bytes`: reading stops there, so an endless or huge body costs no more."""
    parts: list[bytes] = []
    size = 0
    while size < max_bytes and (chunk := await conn.read_chunk(deadline, "total")) is not None:
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)[:max_bytes]


async def is_reachable(backend: Backend, timeout: float = PROBE_TIMEOUT) -> bool:
    """True when the backend answers its kind's probe with a 2xx within `timeout` seconds."""
    return await probe(backend, timeout) is Probe.OK


async def probe(backend: Backend, timeout: float = PROBE_TIMEOUT) -> Probe:
    """The backend's answer to its kind's probe (a 404 `/health` falls back to `/v1/models`)."""
    path = PROBE_PATHS.get(backend.kind, "/health")
    outcome, status = await _probe_path(backend, path, timeout)
    if status == 404 and path != FALLBACK_PATH:
        outcome, status = await _probe_path(backend, FALLBACK_PATH, timeout)
    return outcome


async def _probe_path(backend: Backend, path: str, timeout: float) -> tuple[Probe, int]:
    """One probe GET: its outcome and HTTP status (0 when there was no answer)."""
    try:
        status, _ = await _get(backend, path, timeout, 4096)
    except BackendTimeoutError:
        return Probe.TIMED_OUT, 0
    except (UpstreamError, OSError):
        return Probe.FAILED, 0
    return (Probe.OK if 200 <= status < 300 else Probe.FAILED), status


class RuntimeLoad:
    __slots__ = ("waiting", "running", "kv_usage")

    def __init__(self, waiting: float, running: float, kv_usage: float) -> None:
        self.waiting = waiting
        self.running = running
        self.kv_usage = kv_usage


def parse_runtime_load(kind: str, text: str) -> RuntimeLoad | None:
    """The kind's load in a Prometheus text exposition: queue metrics summed over all label sets (one per
    model or LoRA), KV-cache usage the largest. None when none of them appear or the text does not parse."""
    names = RUNTIME_METRICS.get(kind)
    if names is None:
        return None
    waiting_names, running_names, kv_names = names
    waiting = running = kv_usage = 0.0
    found = False
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:  # sample.name: the family's may lose a `_total` suffix
                if sample.name in waiting_names:
                    waiting += sample.value
                elif sample.name in running_names:
                    running += sample.value
                elif sample.name in kv_names:
                    kv_usage = max(kv_usage, sample.value)
                else:
                    continue
                found = True
    except ValueError:  # the parser's one error for text that is not an exposition (an HTML page, a cut line)
        return None
    return RuntimeLoad(waiting, running, kv_usage) if found else None


async def read_runtime_load(backend: Backend, timeout: float = PROBE_TIMEOUT) -> RuntimeLoad | None:
    if backend.kind not in RUNTIME_METRICS:
        return None
    status, body = await http_get(backend, "/metrics", timeout, MAX_METRICS_BYTES)
    if status != 200:
        return None
    if len(body) >= MAX_METRICS_BYTES:  # cut short: drop the partial last line, which would fail the parse
        body = body[: body.rfind(b"\n") + 1]
    return parse_runtime_load(backend.kind, body.decode("utf-8", "replace"))
