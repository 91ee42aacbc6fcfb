"""A simulated OpenAI-compatible LLM runtime that speaks vLLM's HTTP protocol without a GPU.

Integration tests, the demo and the benchmarks need an upstream with real wire behaviour (SSE framing,
batch queueing, mid-stream crashes, client-disconnect cancellation) and controllable timing. With
`ttft_ms=0, tokens_per_second=0` it never sleeps, so the per-request path is kept lean for benchmarks.
This module owns failures, disconnects and HTTP, once for every API (`_generate`, `_stream`, `_pool`); slots,
prefix cache and pacing are `sim/engine.py`, the knobs `sim/config.py`; the wire shapes are `sim/protocol.py`
(OpenAI chat, completions), `sim/embeddings.py`, `sim/responses.py` (OpenAI Responses), `sim/messages.py`
(Anthropic Messages), `sim/ranking.py` (rerank, score).
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from proxy.sim import embeddings, messages, ranking, responses
from proxy.sim import protocol as wire
from proxy.sim.config import Pacer, SimConfig, SimStats
from proxy.sim.engine import Engine
from proxy.sim.sequence import SequenceState

__all__ = ["Pacer", "SimConfig", "SimRuntime", "SimStats", "serve"]


class _Headers(dict[str, str]):
    """Request headers with case-insensitive lookup (RFC 9110): keys are stored lower-cased.

    Clients re-case names on the wire (aiohttp sends `X-Request-Id` as `X-Request-ID`), so tests must
    be able to ask for a header in any case.
    """

    __slots__ = ()

    def __getitem__(self, key: str) -> str:
        return dict.__getitem__(self, key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and dict.__contains__(self, key.lower())

    def get(self, key: str, default: Any = None) -> Any:
        return dict.get(self, key.lower(), default)


class SimRuntime:
    """One simulated runtime: its config, live stats, engine (slots, cache, pacing) and the aiohttp app."""

    __slots__ = (
        "config",
        "stats",
        "last_headers",
        "last_body",
        "cancelled_event",
        "_engine",
        "_rng",
        "_seq",
        "_metric_label",
        "_responses",
    )

    def __init__(self, config: SimConfig, pacer: Pacer | None = None) -> None:
        config.validate()
        self.config = config
        self.stats = SimStats()
        self.last_headers: dict[str, str] | None = None
        self.last_body: dict[str, Any] | None = None
        self.cancelled_event = asyncio.Event()
        self._engine = Engine(config, self.stats, pacer)
        self._rng = random.Random(config.seed)
        self._seq = 0
        self._metric_label = orjson.dumps(config.models[0]).decode()
        self._responses = responses.ResponseStore()

    def build_app(self) -> web.Application:
        """The aiohttp app; serve it with `handler_cancellation=True` so disconnects cancel handlers."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v1/responses", self._responses_create)
        app.router.add_get("/v1/responses/{response_id}", self._responses_get)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/messages/count_tokens", self._count_tokens)
        app.router.add_post("/v1/rerank", self._rerank)
        app.router.add_post("/v1/score", self._score)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model:.+}", self._model)  # ids may hold a slash (org/name)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        return app

    # ---- common request handling

    def _note_cancel(self) -> None:
        self.stats.cancelled += 1
        self.cancelled_event.set()

    async def _read_json(self, request: web.Request) -> dict[str, Any]:
        self.stats.requests += 1
        self.last_headers = _Headers((k.lower(), v) for k, v in request.headers.items())
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            raise wire.invalid("request body is not valid JSON", "invalid_json") from None
        if not isinstance(body, dict):
            raise wire.invalid("request body must be a JSON object", "invalid_json")
        self.last_body = body
        return body

    def _draw_failure(self) -> bool:
        rate = self.config.fail_rate
        if rate > 0 and self._rng.random() < rate:
            self.stats.failed += 1
            return True
        return False

    def _parse_generation(self, body: dict[str, Any], chat: bool) -> wire.Job:
        model = wire.model_of(body, self.config.models)
        if chat:
            source = body.get("messages")
            prompt_tokens = wire.chat_prompt_tokens(source)
        else:
            source = body.get("prompt")
            prompt_tokens = wire.completion_prompt_tokens(source)
        n = wire.max_tokens_of(body, self.config.default_max_tokens)
        if 0 < self.config.max_context < prompt_tokens + n:
            raise wire.context_exceeded(self.config.max_context, prompt_tokens, n)
        self._seq += 1
        opts = body.get("stream_options")
        return wire.Job(
            chat=chat,
            model=model,
            rid=f"{'chatcmpl' if chat else 'cmpl'}-{self._seq}",
            created=int(time.time()),
            prompt_tokens=prompt_tokens,
            tokens=wire.choose_tokens(self._rng, n, body.get("temperature"), model, source, n),
            include_usage=isinstance(opts, dict) and opts.get("include_usage") is True,
            source=source,
        )

    def _parse_chat(self, body: dict[str, Any]) -> wire.Generation:
        return self._parse_generation(body, chat=True)

    def _parse_completion(self, body: dict[str, Any]) -> wire.Generation:
        return self._parse_generation(body, chat=False)

    def _parse_response(self, body: dict[str, Any]) -> wire.Generation:
        return responses.parse(body, self.config, self._rng, self._responses)

    def _parse_message(self, body: dict[str, Any]) -> wire.Generation:
        return messages.parse(body, self.config, self._rng)

    def _parse_embeddings(self, body: dict[str, Any]) -> wire.Pooling:
        self._seq += 1
        return embeddings.parse_embeddings(body, self.config.models, self.config.embedding_dim, f"embd-{self._seq}")

    def _parse_rerank(self, body: dict[str, Any]) -> wire.Pooling:
        return ranking.parse_rerank(body, self.config.models)

    def _parse_score(self, body: dict[str, Any]) -> wire.Pooling:
        return ranking.parse_score(body, self.config.models)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, self._parse_chat, wire.render_error)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, self._parse_completion, wire.render_error)

    async def _responses_create(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, self._parse_response, wire.render_error)

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, self._parse_message, messages.render_error)

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._pool(request, self._parse_embeddings, wire.render_error)

    async def _rerank(self, request: web.Request) -> web.StreamResponse:
        return await self._pool(request, self._parse_rerank, wire.render_error)

    async def _score(self, request: web.Request) -> web.StreamResponse:
        return await self._pool(request, self._parse_score, wire.render_error)

    # ---- the one generation path: every API's parse and error shape, the same slots, pacing and failures

    async def _generate(
        self,
        request: web.Request,
        parse: Callable[[dict[str, Any]], wire.Generation],
        render: wire.ErrorRenderer,
    ) -> web.StreamResponse:
        try:
            try:
                body = await self._read_json(request)
                job = parse(body)
            except wire.BadRequest as e:
                return render(e)
            if self._draw_failure():
                return render(wire.FAILURE)
            engine = self._engine
            state = engine.sequence(job)
            if body.get("stream") is True:
                return await self._stream(request, job, state)
            await engine.slots.acquire()
            try:
                engine.admit(job, state)
                await engine.pace_all(job, state)
            finally:
                engine.leave(state)
            self.stats.completed += 1
            engine.remember(job)
            out = job.body()
            job.complete()
            return web.Response(body=out, content_type=wire.JSON)
        except asyncio.CancelledError:
            self._note_cancel()
            raise

    async def _stream(self, request: web.Request, job: wire.Generation, state: SequenceState) -> web.StreamResponse:
        """Each token's frame is its own write, so an unbuffered relay is observable. The head (events the
        API sends before generating, e.g. `response.created`) goes out before the batch slot is taken."""
        engine = self._engine
        n = len(job.tokens)
        rate = self.config.stream_fail_rate
        cut_after = max(1, n // 2) if rate > 0 and self._rng.random() < rate else 0
        resp = web.StreamResponse(headers=wire.SSE_HEADERS)
        try:
            await resp.prepare(request)
            head = job.head()
            if head:
                await resp.write(head)
            await engine.slots.acquire()
            try:
                engine.admit(job, state)
                for i, token in enumerate(job.tokens):
                    await engine.pace(job.rid, i, state)
                    await resp.write(job.frame(i, token))
                    if i + 1 == cut_after:
                        self._cut(request)
                        return resp
                for part in job.tail():
                    await resp.write(part)
            finally:
                engine.leave(state)
            await resp.write_eof()
        except ConnectionError:  # the write noticed the client left before the cancellation arrived
            self._note_cancel()
            return resp
        self.stats.completed += 1
        engine.remember(job)
        job.complete()
        return resp

    def _cut(self, request: web.Request) -> None:
        """Crash mid-stream: drop the connection with no stream end and no chunked terminator."""
        self.stats.cut += 1
        transport = request.transport
        if transport is not None:
            transport.abort()

    async def _pool(
        self,
        request: web.Request,
        parse: Callable[[dict[str, Any]], wire.Pooling],
        render: wire.ErrorRenderer,
    ) -> web.StreamResponse:
        """One forward pass, no tokens out (embeddings, rerank, score): a slot for the prefill only."""
        try:
            try:
                body = await self._read_json(request)
                job = parse(body)
            except wire.BadRequest as e:
                return render(e)
            if self._draw_failure():
                return render(wire.FAILURE)
            slots = self._engine.slots
            await slots.acquire()
            try:
                await self._engine.pace(job.rid, 0, SequenceState(job.prompt_tokens))
            finally:
                slots.release()
            self.stats.completed += 1
            return web.Response(body=job.body(), content_type=wire.JSON)
        except asyncio.CancelledError:
            self._note_cancel()
            raise

    async def _count_tokens(self, request: web.Request) -> web.Response:
        """Anthropic's `count_tokens`: tokenization only, no slot and no pacing."""
        try:
            body = await self._read_json(request)
            n = messages.count_tokens(body, self.config)
        except wire.BadRequest as e:
            return messages.render_error(e)
        if self._draw_failure():
            return messages.render_error(wire.FAILURE)
        return web.Response(body=orjson.dumps({"input_tokens": n}), content_type=wire.JSON)

    # ---- control endpoints

    async def _models(self, request: web.Request) -> web.Response:
        data = [wire.model_card(m) for m in self.config.models]
        return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type=wire.JSON)

    async def _model(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        if model not in self.config.models:
            return wire.render_error(wire.model_not_found(model))
        return web.Response(body=orjson.dumps(wire.model_card(model)), content_type=wire.JSON)

    async def _responses_get(self, request: web.Request) -> web.Response:
        rid = request.match_info["response_id"]
        stored = self._responses.get(rid)
        if stored is None:
            return wire.render_error(responses.not_found(rid))
        return web.Response(body=orjson.dumps(stored.body), content_type=wire.JSON)

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def _metrics(self, request: web.Request) -> web.Response:
        """vLLM's gauge names, written by hand: several sims can share a process, so no global registry."""
        label = f"{{model_name={self._metric_label}}}"
        s = self.stats
        text = (
            "# HELP vllm:num_requests_running Number of requests currently generating.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running{label} {s.running}\n"
            "# HELP vllm:num_requests_waiting Number of requests waiting for a batch slot.\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f"vllm:num_requests_waiting{label} {s.waiting}\n"
            "# HELP vllm:request_success_total Requests answered in full.\n"
            "# TYPE vllm:request_success_total counter\n"
            f"vllm:request_success_total{label} {s.completed}\n"
        )
        cache = self._engine.cache
        if cache is not None:
            text += (
                "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n"
                "# TYPE vllm:kv_cache_usage_perc gauge\n"
                f"vllm:kv_cache_usage_perc{label} {self._engine.kv_cache_usage()}\n"
                "# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.\n"
                "# TYPE vllm:prefix_cache_queries_total counter\n"
                f"vllm:prefix_cache_queries_total{label} {cache.queried_tokens}\n"
                "# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.\n"
                "# TYPE vllm:prefix_cache_hits_total counter\n"
                f"vllm:prefix_cache_hits_total{label} {cache.hit_tokens}\n"
            )
        return web.Response(text=text, content_type="text/plain", charset="utf-8")


async def serve(config: SimConfig, host: str, port: int, ready: asyncio.Event | None = None,
                ssl_context: ssl.SSLContext | None = None) -> None:
    """Serve one simulated runtime until cancelled (over TLS with `ssl_context`, as a runtime behind an
    https:// URL); `ready` is set once it accepts connections."""
    runner = web.AppRunner(SimRuntime(config).build_app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
