"""Simulated OpenAI-compatible runtime: stands in for a GPU in tests, the demo and benchmarks."""
