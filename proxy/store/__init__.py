"""Shared state (keys, counts, quotas) behind one narrow protocol `Store`: embedded and Redis implementations."""

from __future__ import annotations

from proxy.store.base import OwnedStore, Store
from proxy.store.memory import MemoryStore
from proxy.store.quota import Adjust, Claim, QuotaBatch, QuotaTable, Rate, Slot, Verdict

__all__ = [
    "Adjust", "Claim", "MemoryStore", "OwnedStore", "QuotaBatch", "QuotaTable", "Rate", "Slot", "Store", "Verdict",
]
