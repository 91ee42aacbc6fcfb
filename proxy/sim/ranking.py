"""Cross-encoder APIs: `POST /v1/rerank` (llama.cpp server, vLLM, the Jina/Cohere shape) and `POST /v1/score`
(vLLM). Request parsing, deterministic relevance, and the answer bodies; no I/O, no timing (the runtime drives
each job as a `Pooling`). Relevance is word overlap with the query plus a small seeded-hash tie-break, so it
is the same on every run and runtime, and a document sharing more of the query's words ranks higher.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.sim import protocol as wire

__all__ = ["RerankJob", "ScoreJob", "parse_rerank", "parse_score", "relevance"]

_WORD = re.compile(r"\w+")


def relevance(query: str, document: str) -> float:
    """In [0, 1): 0.99 x the share of the query's words found in the document, plus up to 0.01 of hash."""
    asked = set(_WORD.findall(query.lower()))
    found = set(_WORD.findall(document.lower()))
    overlap = len(asked & found) / len(asked) if asked else 0.0
    digest = hashlib.blake2b(orjson.dumps([query, document]), digest_size=8).digest()
    return 0.99 * overlap + 0.01 * (int.from_bytes(digest, "little") / 2**64)


def _pair_tokens(a: str, b: str) -> int:
    """A cross-encoder reads each pair whole: both texts count once per pair."""
    return max(1, len(a) // 4) + max(1, len(b) // 4)


def _texts(value: Any, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise wire.invalid(f"`{name}` must be a string or a non-empty list of strings")


@dataclass(slots=True)
class RerankJob:
    """One parsed rerank request (a `Pooling`)."""

    rid: str
    model: str
    prompt_tokens: int
    query: str
    documents: list[str]
    top_n: int  # 0 = all
    return_documents: bool

    def body(self) -> bytes:
        scored = sorted(
            ((i, relevance(self.query, d)) for i, d in enumerate(self.documents)), key=lambda p: (-p[1], p[0])
        )
        if self.top_n:
            scored = scored[: self.top_n]
        results: list[dict[str, Any]] = []
        for i, score in scored:
            result: dict[str, Any] = {"index": i, "relevance_score": score}
            if self.return_documents:
                result["document"] = {"text": self.documents[i]}
            results.append(result)
        usage = {"prompt_tokens": self.prompt_tokens, "total_tokens": self.prompt_tokens}
        return orjson.dumps({"id": self.rid, "model": self.model, "object": "list", "usage": usage, "results": results})


def parse_rerank(body: dict[str, Any], models: tuple[str, ...]) -> RerankJob:
    model = wire.model_of(body, models)
    query = body.get("query")
    if not isinstance(query, str):
        raise wire.invalid("`query` must be a string")
    documents = body.get("documents")
    if not isinstance(documents, list) or not documents or not all(isinstance(d, str) for d in documents):
        raise wire.invalid("`documents` must be a non-empty list of strings")
    top_n = body.get("top_n") or 0
    if type(top_n) is not int or top_n < 0:
        raise wire.invalid("`top_n` must be a positive integer")
    return_documents = body.get("return_documents", False)
    if not isinstance(return_documents, bool):
        raise wire.invalid("`return_documents` must be a boolean")
    prompt_tokens = sum(_pair_tokens(query, d) for d in documents)
    return RerankJob(f"rerank-{uuid.uuid4().hex}", model, prompt_tokens, query, documents, top_n, return_documents)


@dataclass(slots=True)
class ScoreJob:
    """One parsed score request (a `Pooling`): one score per (text_1, text_2) pair, in request order."""

    rid: str
    model: str
    prompt_tokens: int
    pairs: list[tuple[str, str]]

    def body(self) -> bytes:
        data = [{"index": i, "object": "score", "score": relevance(a, b)} for i, (a, b) in enumerate(self.pairs)]
        usage = {
            "prompt_tokens": self.prompt_tokens,
            "total_tokens": self.prompt_tokens,
            "completion_tokens": 0,
            "prompt_tokens_details": None,
        }
        return orjson.dumps(
            {"id": self.rid, "object": "list", "created": int(time.time()), "model": self.model, "data": data,
             "usage": usage}
        )


def parse_score(body: dict[str, Any], models: tuple[str, ...]) -> ScoreJob:
    """vLLM's pairing: one `text_1` against each `text_2`, or equal-length lists pair by position."""
    model = wire.model_of(body, models)
    left = _texts(body.get("text_1"), "text_1")
    right = _texts(body.get("text_2"), "text_2")
    if len(left) == 1:
        pairs = [(left[0], r) for r in right]
    elif len(left) == len(right):
        pairs = list(zip(left, right))
    else:
        raise wire.invalid("`text_1` must be one text or as many texts as `text_2`")
    prompt_tokens = sum(_pair_tokens(a, b) for a, b in pairs)
    return ScoreJob(f"score-{uuid.uuid4().hex}", model, prompt_tokens, pairs)
