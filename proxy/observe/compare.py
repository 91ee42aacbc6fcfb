"""Side-by-side comparison of a primary answer and its shadow's: numbers only, never text kept.

Pure: bytes of two answers (JSON bodies or SSE streams, assembled here) and their timings in, one
`Comparison` out — status match, latency and TTFT ratios, token deltas, an exact-match flag and a
normalised similarity (word-sequence ratio for text, cosine for embeddings). Runs off the request path
(`pipeline/shadow.py` schedules it after both sides finished; metrics and the rollout analysis read the result); inputs are capped so it stays cheap.
"""

from __future__ import annotations

import base64
import math
import struct
from dataclasses import dataclass
from difflib import SequenceMatcher
from typing import Any

import orjson

MAX_CAPTURE_BYTES = 1024 * 1024  # output kept per side for comparing; beyond it only timings count
MAX_WORDS = 2000  # SequenceMatcher is quadratic in the worst case: compare the first words only


@dataclass(frozen=True, slots=True)
class Side:
    """One answer as observed: status, seconds from its own send to first byte / to the end, usage, bytes."""

    status: int
    duration: float
    ttft: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    output: bytes
    is_stream: bool


@dataclass(frozen=True, slots=True)
class Comparison:
    request_id: str
    route: str
    pool: str
    primary_status: int
    shadow_status: int
    status_match: bool
    latency_ratio: float | None  # shadow / primary
    ttft_ratio: float | None
    prompt_tokens_delta: int | None  # shadow - primary
    completion_tokens_delta: int | None
    exact_match: bool
    similarity: float | None  # 0..1; None when either side has no output to compare

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


def compare(request_id: str, route: str, pool: str, primary: Side, shadow: Side) -> Comparison:
    a, b = extract_output(primary), extract_output(shadow)
    exact, score = similarity(a, b)
    return Comparison(
        request_id=request_id,
        route=route,
        pool=pool,
        primary_status=primary.status,
        shadow_status=shadow.status,
        status_match=primary.status == shadow.status,
        latency_ratio=_ratio(shadow.duration, primary.duration),
        ttft_ratio=_ratio(shadow.ttft, primary.ttft),
        prompt_tokens_delta=_delta(shadow.prompt_tokens, primary.prompt_tokens),
        completion_tokens_delta=_delta(shadow.completion_tokens, primary.completion_tokens),
        exact_match=exact,
        similarity=score,
    )


Output = str | list[float] | None


def extract_output(side: Side) -> Output:
    """The generated text (choices concatenated; a Responses or Messages answer's text parts), the first
    embedding vector, or a rerank / score answer's scores in document order; None for errors."""
    if side.status != 200 or not side.output:
        return None
    if side.is_stream:
        return _stream_text(side.output)
    try:
        data = orjson.loads(side.output)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    if data.get("object") == "list" and isinstance(data.get("data"), list):
        first = data["data"][0] if data["data"] else None
        vector = first.get("embedding") if isinstance(first, dict) else None
        if isinstance(vector, str):  # encoding_format=base64 (the openai SDK's default): little-endian float32
            raw = base64.b64decode(vector)
            return list(struct.unpack(f"<{len(raw) // 4}f", raw[: len(raw) // 4 * 4]))
        if isinstance(vector, list):
            return vector
    if data.get("object") == "response":  # the Responses API: output items, their output_text parts
        return "".join(_parts_text(item.get("content"), "output_text") for item in data.get("output") or []
                       if isinstance(item, dict))
    if data.get("type") == "message":  # Anthropic's Messages API: text content blocks
        return _parts_text(data.get("content"), "text")
    scores = _scores(data.get("results") if isinstance(data.get("results"), list) else data.get("data"))
    if scores is not None:
        return scores
    return "".join(_choice_text(choice, "message") for choice in data.get("choices") or [])


def similarity(a: Output, b: Output) -> tuple[bool, float | None]:
    if a is None or b is None:
        return False, None
    if isinstance(a, list) and isinstance(b, list):
        return a == b, _cosine(a, b)
    if isinstance(a, str) and isinstance(b, str):
        if a == b:
            return True, 1.0
        words_a, words_b = a.split()[:MAX_WORDS], b.split()[:MAX_WORDS]
        if not words_a and not words_b:
            return False, 1.0  # differ only in whitespace
        return False, SequenceMatcher(None, words_a, words_b, autojunk=False).ratio()
    return False, 0.0


def _stream_text(raw: bytes) -> str | None:
    parts: list[str] = []
    for event in raw.split(b"\n\n"):
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                continue
            try:
                data = orjson.loads(payload)
            except orjson.JSONDecodeError:
                continue
            if isinstance(data, dict):
                if "error" in data or data.get("type") == "error":
                    return None
                parts.append(_event_text(data))
    return "".join(parts)


def _event_text(data: dict[str, Any]) -> str:
    """The text one stream event adds: chat / completion choices, a Responses `output_text.delta`, or a
    Messages `text_delta`."""
    kind = data.get("type")
    if kind == "response.output_text.delta":
        delta = data.get("delta")
        return delta if isinstance(delta, str) else ""
    if kind == "content_block_delta":
        delta = data.get("delta")
        text = delta.get("text") if isinstance(delta, dict) else None
        return text if isinstance(text, str) else ""
    return "".join(_choice_text(choice, "delta") for choice in data.get("choices") or [])


def _parts_text(parts: object, kind: str) -> str:
    if not isinstance(parts, list):
        return ""
    return "".join(part["text"] for part in parts
                   if isinstance(part, dict) and part.get("type") == kind and isinstance(part.get("text"), str))


def _scores(items: object) -> list[float] | None:
    """Rerank `results` (relevance_score) or score `data` (score), ordered by document index."""
    if not isinstance(items, list) or not items:
        return None
    found: dict[int, float] = {}
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("index"), int):
            return None
        score = item.get("relevance_score", item.get("score"))
        if not isinstance(score, (int, float)):
            return None
        found[item["index"]] = float(score)
    return [found[i] for i in sorted(found)]


def _choice_text(choice: object, key: str) -> str:
    if not isinstance(choice, dict):
        return ""
    message = choice.get(key)
    if isinstance(message, dict) and isinstance(message.get("content"), str):
        return str(message["content"])
    text = choice.get("text")
    return text if isinstance(text, str) else ""


def _cosine(a: list[float], b: list[float]) -> float:
    if len(a) != len(b) or not a:
        return 0.0
    dot = sum(x * y for x, y in zip(a, b))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return max(0.0, min(1.0, dot / norm)) if norm else 0.0


def _ratio(shadow: float | None, primary: float | None) -> float | None:
    if shadow is None or primary is None or primary <= 0:
        return None
    return shadow / primary


def _delta(shadow: int | None, primary: int | None) -> int | None:
    return None if shadow is None or primary is None else shadow - primary
