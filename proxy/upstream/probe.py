"""Health probes: one GET to the endpoint each runtime kind uses to say it can serve.

vLLM, llama.cpp and TGI answer `/health` (llama.cpp says 503 while the model loads); Ollama answers `/`;
a generic OpenAI-compatible server is asked for `/v1/models`. A probe opens its own short-lived
connection so it never competes with, or poisons, the request pool. Called by /readyz.
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
PROBE_TIMEOUT = 1.0


async def is_reachable(backend: Backend, timeout: float = PROBE_TIMEOUT) -> bool:
    """True when the backend answers its probe with a 2xx status within `timeout` seconds."""
    path = backend.base_path + PROBE_PATHS.get(backend.kind, "/health")
    auth = f"Authorization: Bearer {backend.api_key}\r\n" if backend.api_key else ""
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {backend.host}:{backend.port}\r\n{auth}Connection: close\r\n\r\n"
    ).encode("latin-1")
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(backend.host, backend.port)
            writer.write(request)
            status_line = await reader.readline()
    except (OSError, TimeoutError):
        return False
    finally:
        if writer is not None:
            writer.close()
    parts = status_line.split(b" ", 2)
    return len(parts) >= 2 and parts[1][:1] == b"2"
