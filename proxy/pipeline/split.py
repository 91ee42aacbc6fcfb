"""Split policy: which variant of a route serves a request. Pure: no awaits, clocks, I/O or aiohttp.

`draw` maps a number in [0, 1) onto the variants' cumulative weights (weight 0 never wins). Sticky
subjects draw with `subject_unit`, a hash of (route, subject), so a subject's first assignment, and the
fallback used while the store is down, are the same variant on every replica. `kept_variant` says whether
a stored assignment still holds after a reload. `pipeline/assignment.py` does the store I/O around these.
"""

from __future__ import annotations

import hashlib

from proxy.config.model import Variant

# split_assignments_total{source}: found in the store / newly drawn (stored, or per-request) / store down
STICKY = "sticky"
NEW = "new"
FALLBACK = "fallback"

KEY_PREFIX = "splitstream:sticky:"
_UNIT = float(1 << 64)


def draw(variants: tuple[Variant, ...], unit: float) -> Variant:
    """The variant whose cumulative-weight interval holds `unit` (0 <= unit < 1) scaled to the total.

    Variants keep their rule-file order, so raising the last variant's weight only moves subjects into it
    (a growing canary keeps the users it already has)."""
    total = 0.0
    for variant in variants:
        total += variant.weight
    target = unit * total
    last = variants[0]
    acc = 0.0
    for variant in variants:
        if variant.weight > 0:
            acc += variant.weight
            last = variant
            if target < acc:
                return variant
    return last  # unit * total rounded up to the total: the last variant with weight


def subject_digest(subject: str) -> str:
    """What identifies a subject in keys: 32 hex digits of its SHA-256 (never the subject itself)."""
    return hashlib.sha256(subject.encode("utf-8", "surrogatepass")).hexdigest()[:32]  # (a header's odd bytes)


def sticky_key(route_name: str, digest: str) -> str:
    return f"{KEY_PREFIX}{route_name}:{digest}"


def subject_unit(route_name: str, digest: str) -> float:
    """A uniform number in [0, 1) fixed by (route, subject): the same on every replica and every run."""
    raw = hashlib.sha256(f"{route_name}\0{digest}".encode()).digest()
    return int.from_bytes(raw[:8], "big") / _UNIT


def kept_variant(variants: tuple[Variant, ...], stored: bytes) -> Variant | None:
    """The stored assignment if it still stands: the variant exists and has weight > 0. None: reassign."""
    name = stored.decode("utf-8", "replace")
    for variant in variants:
        if variant.weight > 0 and variant.name == name:
            return variant
    return None
