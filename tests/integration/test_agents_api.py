"""Issue 19: the API surface agents use — the OpenAI Responses API, the Anthropic Messages API, rerank and score —
through splitstream's split, shadow, cache, metrics and error handling, with the real `openai` and `anthropic`
SDKs as clients against simulated runtimes that speak those APIs.
"""

from __future__ import annotations

import random
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from tests.conftest import ProxyHandle, backend_url

KEY = "client-secret"
BACKEND_KEY = "backend-secret"


def rules(a: Any, b: Any, shadow: Any, extra_route: str = "") -> str:
    """Route `agents` (model my-model, every endpoint): a 50/50 split over two runtimes (no stickiness: each
    request draws), mirrored to a third, cached; both runtimes take the backend's own key."""
    return f"""
backends:
  a-1: {{url: "{backend_url(a)}", kind: vllm, api_key_env: BACKEND_KEY}}
  b-1: {{url: "{backend_url(b)}", kind: vllm, api_key_env: BACKEND_KEY}}
  m-1: {{url: "{backend_url(shadow)}", kind: vllm}}
pools:
  pa: {{backends: [a-1], model: sim-model}}
  pb: {{backends: [b-1], model: sim-model}}
  mirror: {{backends: [m-1], model: sim-model}}
routes:
  - name: agents
    match: {{model: my-model}}
    split:
      variants:
        - {{name: stable, pool: pa, weight: 50}}
        - {{name: canary, pool: pb, weight: 50}}
    shadow: [{{pool: mirror, sample: 1.0}}]
    cache: {{ttl: 10m}}
{extra_route}
"""


async def start(sim: Any, proxy: Any, extra_route: str = "") -> tuple[ProxyHandle, list[Any]]:
    runtimes = [await sim() for _ in range(3)]
    handle: ProxyHandle = await proxy(rules(*(server for _, server in runtimes), extra_route=extra_route),
                                      client_keys=[KEY], env={"BACKEND_KEY": BACKEND_KEY})
    handle.splitter.rng = random.Random(11)
    return handle, [runtime for runtime, _ in runtimes]


def tokens(handle: ProxyHandle) -> dict[str, float]:
    """splitstream_tokens_total of route `agents`, summed per kind."""
    totals: dict[str, float] = {}
    for family in handle.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "splitstream_tokens_total" and sample.labels["route"] == "agents":
                totals[sample.labels["kind"]] = totals.get(sample.labels["kind"], 0.0) + sample.value
    return totals


def comparisons(handle: ProxyHandle) -> dict[str, float]:
    found: dict[str, float] = {}
    for family in handle.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "splitstream_shadow_comparisons_total":
                found[sample.labels["exact_match"]] = found.get(sample.labels["exact_match"], 0.0) + sample.value
    return found


def openai_client(handle: ProxyHandle) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=handle.url("/v1"), api_key=KEY, max_retries=0)


def anthropic_client(handle: ProxyHandle) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=handle.url(""), api_key=KEY, max_retries=0)


# ---------------------------------------------------------------------------------------- Responses


async def test_responses_non_stream_and_stream_through_a_split(sim: Any, proxy: Any) -> None:
    handle, _ = await start(sim, proxy)
    api = openai_client(handle)
    raw = await api.responses.with_raw_response.create(model="my-model", input="Say hello", max_output_tokens=6)
    assert raw.headers["x-splitstream-variant"] in ("stable", "canary")
    answer = raw.parse()
    assert answer.status == "completed" and answer.output_text
    assert answer.usage is not None and answer.usage.output_tokens == 6
    assert tokens(handle) == {"prompt": answer.usage.input_tokens, "completion": 6}

    stream = await api.responses.create(model="my-model", input="Say hello", max_output_tokens=5, stream=True)
    events = [event async for event in stream]
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert len(deltas) == 5
    final = events[-1].response  # type: ignore[union-attr]
    assert final.usage is not None and final.usage.output_tokens == 5
    assert tokens(handle)["completion"] == 11  # the stream's usage counted too (read from response.completed)


async def test_responses_are_compared_with_their_shadow_and_replayed_from_the_cache(sim: Any, proxy: Any) -> None:
    handle, runtimes = await start(sim, proxy)
    api = openai_client(handle)
    request: dict[str, Any] = {"model": "my-model", "input": "Cache me", "max_output_tokens": 4, "temperature": 0,
                               "store": False, "stream": True}
    first = await api.responses.with_raw_response.create(**request)
    first_events = [event async for event in first.parse()]
    assert first.headers["x-splitstream-cache"] == "miss"
    await handle.shadows.idle()
    assert comparisons(handle) == {"true": 1.0}  # same model, temperature 0: the texts were read and matched

    served = sum(r.stats.requests for r in runtimes)
    again = await api.responses.with_raw_response.create(**request)
    again_events = [event async for event in again.parse()]
    assert again.headers["x-splitstream-cache"] == "hit"
    assert sum(r.stats.requests for r in runtimes) == served  # no runtime was asked
    assert [e.type for e in again_events] == [e.type for e in first_events]  # replayed as events
    text = "".join(e.delta for e in again_events if e.type == "response.output_text.delta")
    assert text == "".join(e.delta for e in first_events if e.type == "response.output_text.delta")

    stored = {**request, "store": True}  # held by the runtime: never from the cache
    for _ in range(2):
        raw = await api.responses.with_raw_response.create(**stored)
        [event async for event in raw.parse()]
        assert raw.headers["x-splitstream-cache"] == "bypass"


async def test_a_follow_up_goes_to_the_backend_holding_its_previous_response(sim: Any, proxy: Any) -> None:
    handle, runtimes = await start(sim, proxy)
    api = openai_client(handle)
    first = await api.responses.with_raw_response.create(model="my-model", input="Remember 7", max_output_tokens=3)
    holder = first.headers["x-splitstream-backend"]
    previous = first.parse().id
    await handle.endpoints.owners.writes_done()
    for _ in range(12):  # a 50/50 split without stickiness would send about half elsewhere
        follow = await api.responses.with_raw_response.create(model="my-model", input="And now?",
                                                              previous_response_id=previous, max_output_tokens=3)
        assert follow.headers["x-splitstream-backend"] == holder
        assert follow.parse().previous_response_id == previous
        previous = follow.parse().id
        await handle.endpoints.owners.writes_done()

    # The holder leaves the rules: the state went with it, and the client is told so.
    path = handle.rules_dir / "rules.yaml"
    current = path.read_text()
    gone = current.replace("a-1], model", "b-1], model") if holder == "a-1" else current.replace(
        "b-1], model", "a-1], model")
    path.write_text(gone)
    assert (await handle.reloader.reload("test")).result == "success"
    with pytest.raises(openai.NotFoundError) as caught:
        await api.responses.create(model="my-model", input="Still there?", previous_response_id=previous)
    assert caught.value.code == "previous_response_not_found"
    assert holder in caught.value.message


async def test_a_follow_up_whose_backend_died_is_a_clear_503(sim: Any, proxy: Any, aiohttp_server: Any) -> None:
    runtimes = [await sim() for _ in range(3)]
    handle = await proxy(rules(*(server for _, server in runtimes)), client_keys=[KEY],
                         env={"BACKEND_KEY": BACKEND_KEY})
    api = openai_client(handle)
    first = await api.responses.with_raw_response.create(model="my-model", input="hi", max_output_tokens=2)
    holder = first.headers["x-splitstream-backend"]
    await handle.endpoints.owners.writes_done()
    await runtimes[0 if holder == "a-1" else 1][1].close()
    with pytest.raises(openai.InternalServerError) as caught:
        await api.responses.create(model="my-model", input="again", previous_response_id=first.parse().id)
    assert caught.value.status_code == 503
    assert caught.value.code == "previous_response_unavailable"
    assert holder in caught.value.message


# ---------------------------------------------------------------------------------------- Messages


async def test_messages_with_the_anthropic_sdk(sim: Any, proxy: Any) -> None:
    handle, runtimes = await start(sim, proxy)
    api = anthropic_client(handle)
    raw = await api.messages.with_raw_response.create(
        model="my-model", max_tokens=5, messages=[{"role": "user", "content": "Hello"}])
    message = await raw.parse()
    assert raw.headers["x-splitstream-variant"] in ("stable", "canary")
    assert message.type == "message" and message.content[0].type == "text"
    assert message.usage.output_tokens == 5
    assert tokens(handle) == {"prompt": message.usage.input_tokens, "completion": 5}
    served = next(r for r, name in zip(runtimes, ("a-1", "b-1")) if name == raw.headers["x-splitstream-backend"])
    seen = served.last_headers
    assert seen is not None
    assert seen["x-api-key"] == BACKEND_KEY  # the backend's own key, where this API carries it ...
    assert seen["authorization"] == f"Bearer {BACKEND_KEY}"  # ... and as a bearer token
    assert KEY not in seen.values()  # the client's key never reaches the runtime
    assert seen["anthropic-version"]  # the protocol version the SDK asked for

    async with api.messages.stream(model="my-model", max_tokens=4,
                                   messages=[{"role": "user", "content": "Hello"}]) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert len(text.split()) == 4 and final.usage.output_tokens == 4
    # input tokens from message_start, output tokens from message_delta: both counted
    assert tokens(handle) == {"prompt": message.usage.input_tokens + final.usage.input_tokens, "completion": 9}

    counted = await api.messages.count_tokens(model="my-model", messages=[{"role": "user", "content": "Hello"}])
    assert counted.input_tokens == message.usage.input_tokens

    # Anthropic-style clients send their key as x-api-key: accepted, and never passed on.
    async with aiohttp.ClientSession() as session:
        async with session.post(handle.url("/v1/messages"), headers={"x-api-key": KEY},
                                json={"model": "my-model", "max_tokens": 2,
                                      "messages": [{"role": "user", "content": "Hi"}]}) as response:
            assert response.status == 200
            served = next(r for r, name in zip(runtimes, ("a-1", "b-1"))
                          if name == response.headers["x-splitstream-backend"])
    assert served.last_headers is not None and served.last_headers["x-api-key"] == BACKEND_KEY


async def test_messages_errors_come_in_anthropics_shape(sim: Any, proxy: Any) -> None:
    handle, _ = await start(sim, proxy)
    api = anthropic_client(handle)
    with pytest.raises(anthropic.NotFoundError) as unknown:  # splitstream's own refusal
        await api.messages.create(model="no-such-model", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert unknown.value.body == {"type": "error", "error": {"type": "not_found_error",
                                                             "message": unknown.value.body["error"]["message"]}}
    with pytest.raises(anthropic.BadRequestError) as invalid:  # the runtime's, relayed as it said it
        await api.messages.create(model="my-model", max_tokens=0, messages=[{"role": "user", "content": "x"}])
    assert invalid.value.body["type"] == "error"
    async with aiohttp.ClientSession() as session:
        async with session.post(handle.url("/v1/messages"), data=b"{not json",
                                headers={"x-api-key": KEY, "Content-Type": "application/json"}) as response:
            assert response.status == 400
            body = await response.json()
        async with session.post(handle.url("/v1/messages"), json={"model": "my-model"}) as response:
            assert response.status == 401  # no key: Anthropic's authentication_error
            assert (await response.json())["error"]["type"] == "authentication_error"
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"


# ------------------------------------------------------------------------------ rerank, score, models


async def test_rerank_score_and_model_lookup_through_the_route(sim: Any, proxy: Any) -> None:
    handle, _ = await start(sim, proxy)
    headers = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        rerank = {"model": "my-model", "query": "red apple", "documents": ["a green pear", "a red apple", "sky"]}
        async with session.post(handle.url("/v1/rerank"), json=rerank) as response:
            assert response.status == 200
            assert response.headers["x-splitstream-route"] == "agents"
            ranked = await response.json()
        assert ranked["results"][0]["index"] == 1  # the best match first
        assert ranked["usage"]["prompt_tokens"] > 0
        async with session.post(handle.url("/v1/score"),
                                json={"model": "my-model", "text_1": "red apple", "text_2": ["a red apple"]}) as r:
            assert r.status == 200
            assert (await r.json())["data"][0]["object"] == "score"
    model = await openai_client(handle).models.retrieve("my-model")
    assert model.id == "my-model"
    with pytest.raises(openai.NotFoundError):
        await openai_client(handle).models.retrieve("other-model")


async def test_a_broken_messages_stream_ends_with_anthropics_error_event(sim: Any, proxy: Any) -> None:
    """The runtime cuts the stream after its first tokens: the client gets what was sent, then Anthropic's
    `event: error` (its SDK raises), never a silent end."""
    runtimes = [await sim(stream_fail_rate=1.0, tokens_per_second=0.0) for _ in range(3)]
    handle = await proxy(rules(*(server for _, server in runtimes)), client_keys=[KEY],
                         env={"BACKEND_KEY": BACKEND_KEY})
    api = anthropic_client(handle)
    received: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as caught:
        async with api.messages.stream(model="my-model", max_tokens=8,
                                       messages=[{"role": "user", "content": "Hello"}]) as stream:
            async for piece in stream.text_stream:
                received.append(piece)
    assert received  # the tokens before the cut reached the client
    assert caught.value.body == {"type": "error", "error": {
        "type": "api_error", "message": caught.value.body["error"]["message"]}}
    assert sum(r.stats.cut for r, _ in runtimes) == 1
