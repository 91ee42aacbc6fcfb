"""splitstream: a streaming-aware L7 reverse proxy for self-hosted LLM runtimes."""

__version__ = "0.1.0"
