"""OpenAI's embeddings API (`POST /v1/embeddings`) as vLLM serves it: request parsing, deterministic unit vectors,
and the answer body (floats or base64). No I/O, no timing: the runtime drives each job as a `Pooling`
(`sim/runtime.py` `_pool`); the shared shapes are `sim/protocol.py`, the cross-encoders `sim/ranking.py`.
"""

from __future__ import annotations

import base64
import math
import struct
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.sim import protocol as wire

__all__ = ["EmbeddingJob", "embedding", "encode_vector", "parse_embeddings"]


def embedding(text: str, dim: int) -> list[float]:
    """A unit vector derived from the text only: same input, same vector, across runs and processes."""
    rng = wire.seeded_rng(text)
    vec = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


@dataclass(slots=True)
class EmbeddingJob:
    """One parsed embeddings request (a `Pooling`); the vectors are made only once it is answered."""

    rid: str
    model: str
    prompt_tokens: int
    texts: list[str]
    fmt: str
    dim: int

    def body(self) -> bytes:
        data = [
            {"object": "embedding", "index": i, "embedding": encode_vector(embedding(t, self.dim), self.fmt)}
            for i, t in enumerate(self.texts)
        ]
        usage = {"prompt_tokens": self.prompt_tokens, "total_tokens": self.prompt_tokens}
        return orjson.dumps({"object": "list", "data": data, "model": self.model, "usage": usage})


def parse_embeddings(body: dict[str, Any], models: tuple[str, ...], dim: int, rid: str) -> EmbeddingJob:
    model = wire.model_of(body, models)
    texts = embedding_inputs(body.get("input"))
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise wire.invalid("`encoding_format` must be 'float' or 'base64'")
    prompt_tokens = sum(max(1, len(t) // 4) for t in texts)
    return EmbeddingJob(rid, model, prompt_tokens, texts, fmt, dim)


def embedding_inputs(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise wire.invalid("`input` must be a string or a non-empty list of strings")


def encode_vector(vec: list[float], fmt: str) -> list[float] | str:
    """`base64` is little-endian float32, as OpenAI and vLLM send it (the openai SDK asks for it)."""
    if fmt == "float":
        return vec
    return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
