"""Shared key/value state behind one narrow protocol: `Store`, with embedded and Redis implementations."""

from __future__ import annotations

from proxy.store.base import OwnedStore, Store
from proxy.store.memory import MemoryStore

__all__ = ["MemoryStore", "OwnedStore", "Store"]
