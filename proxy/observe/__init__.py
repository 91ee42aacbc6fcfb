"""Metrics (the contract in shared/DESIGN.md) and structured per-request logs."""
