"""Talking to a runtime outside of client traffic: health probes and its own load metrics, per backend kind.

vLLM, llama.cpp and TGI answer `/health` (llama.cpp says 503 while the model loads); Ollama answers `/`;
a generic OpenAI-compatible server is asked for `/v1/models`. A `/health` that is 404 falls back to
`/v1/models`. Load comes from the runtime's Prometheus `/metrics` (vLLM, llama.cpp, TGI). Each call opens
its own short-lived connection so it never competes with, or poisons, the request pool. Called by
`upstream/health.py` and /readyz.
"""

from __future__ import annotations

import asyncio

from proxy.config.model import Backend

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


async def http_get(backend: Backend, path: str, timeout: float, max_bytes: int = 65536) -> tuple[int, bytes]:
    """(status, body) of one GET with Connection: close; (0, b'') when it could not be done in time."""
    auth = f"Authorization: Bearer {backend.api_key}\r\n" if backend.api_key else ""
    request = (
        f"GET {backend.base_path}{path} HTTP/1.1\r\nHost: {backend.host}:{backend.port}\r\n{auth}"
        "Connection: close\r\n\r\n"
    ).encode("latin-1")
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(backend.host, backend.port)
            writer.write(request)
            raw = await reader.read(max_bytes)
            while len(raw) < max_bytes and (more := await reader.read(max_bytes - len(raw))):
                raw += more
    except (OSError, TimeoutError):
        return 0, b""
    finally:
        if writer is not None:
            writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    status = int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0
    if b"transfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    return status, body


def _dechunk(body: bytes) -> bytes:
    out = []
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            break
        if size == 0:
            break
        out.append(rest[:size])
        body = rest[size + 2 :]
    return b"".join(out)


async def is_reachable(backend: Backend, timeout: float = PROBE_TIMEOUT) -> bool:
    """True when the backend answers its kind's probe with a 2xx within `timeout` seconds."""
    path = PROBE_PATHS.get(backend.kind, "/health")
    status, _ = await http_get(backend, path, timeout, max_bytes=4096)
    if status == 404 and path != FALLBACK_PATH:
        status, _ = await http_get(backend, FALLBACK_PATH, timeout, max_bytes=4096)
    return 200 <= status < 300


class RuntimeLoad:
    __slots__ = ("waiting", "running", "kv_usage")

    def __init__(self, waiting: float, running: float, kv_usage: float) -> None:
        self.waiting = waiting
        self.running = running
        self.kv_usage = kv_usage


def parse_runtime_load(kind: str, text: str) -> RuntimeLoad | None:
    """Sum the kind's queue metrics over all label sets in a Prometheus text exposition."""
    names = RUNTIME_METRICS.get(kind)
    if names is None:
        return None
    waiting_names, running_names, kv_names = names
    totals = {"waiting": 0.0, "running": 0.0, "kv": 0.0}
    found = False
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name_end = min((i for i in (line.find("{"), line.find(" ")) if i >= 0), default=-1)
        if name_end < 0:
            continue
        name = line[:name_end]
        for key, group in (("waiting", waiting_names), ("running", running_names), ("kv", kv_names)):
            if name in group:
                try:
                    value = float(line.rsplit(" ", 1)[1])
                except (IndexError, ValueError):
                    continue
                totals[key] = max(totals[key], value) if key == "kv" else totals[key] + value
                found = True
    return RuntimeLoad(totals["waiting"], totals["running"], totals["kv"]) if found else None


async def read_runtime_load(backend: Backend, timeout: float = PROBE_TIMEOUT) -> RuntimeLoad | None:
    if backend.kind not in RUNTIME_METRICS:
        return None
    status, body = await http_get(backend, "/metrics", timeout, MAX_METRICS_BYTES)
    if status != 200:
        return None
    return parse_runtime_load(backend.kind, body.decode("utf-8", "replace"))
