"""`proxy.upstream.probe`: the runtime-metrics parse, as pure tables (`http_get` against real servers is in
tests/integration/test_probe_http.py)."""

from __future__ import annotations

import pytest

from proxy.upstream.probe import parse_runtime_load

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 2.0
vllm:num_requests_running{engine="1",model_name="m"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 4.0
vllm:num_requests_waiting{engine="1",model_name="m"} 1.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.75
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 1234.0
"""


# ------------------------------------------------------------------------------------------------ parse


def test_parse_sums_label_sets_and_takes_the_largest_kv_usage() -> None:
    load = parse_runtime_load("vllm", VLLM_METRICS)
    assert load is not None
    assert (load.waiting, load.running, load.kv_usage) == (5.0, 5.0, 0.75)


def test_parse_reads_the_value_not_the_timestamp() -> None:
    text = 'vllm:num_requests_waiting{model="m"} 3 1700000000000\nvllm:num_requests_running{model="m"} 1 1700000000000\n'
    load = parse_runtime_load("vllm", text)
    assert load is not None and (load.waiting, load.running, load.kv_usage) == (3.0, 1.0, 0.0)


@pytest.mark.parametrize(
    ("kind", "text", "expected"),
    [
        # untyped, no labels, no trailing newline
        ("tgi", "tgi_queue_size 7\ntgi_batch_current_size 2", (7.0, 2.0, 0.0)),
        ("llamacpp", "# TYPE llamacpp:requests_deferred gauge\nllamacpp:requests_deferred 1\n"
                     "# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 4\n", (1.0, 4.0, 0.0)),
        # the older vLLM name for KV usage; only one of the kind's metrics present is enough
        ("vllm", 'vllm:gpu_cache_usage_perc{model_name="a"} 0.5\nvllm:gpu_cache_usage_perc{model_name="b"} 0.2\n',
         (0.0, 0.0, 0.5)),
        ("vllm", "vllm:num_requests_waiting 0\n", (0.0, 0.0, 0.0)),  # zero is a reading, not an absence
    ],
)
def test_parse_per_kind(kind: str, text: str, expected: tuple[float, float, float]) -> None:
    load = parse_runtime_load(kind, text)
    assert load is not None and (load.waiting, load.running, load.kv_usage) == expected


@pytest.mark.parametrize(
    ("kind", "text"),
    [
        ("openai", VLLM_METRICS),  # a kind without runtime metrics
        ("ollama", VLLM_METRICS),
        ("tgi", VLLM_METRICS),  # none of the kind's metrics appear
        ("vllm", ""),
        ("vllm", "<html><body>Not Found</body></html>\n"),
        ("vllm", "hello world\n"),
        ("vllm", "# TYPE vllm:num_requests_waiting bogus\nvllm:num_requests_waiting 1\n"),
        ("vllm", 'vllm:num_requests_waiting{model="m"} 3\nvllm:num_requests_running{mod'),  # cut mid-line
    ],
)
def test_parse_returns_none_without_a_reading(kind: str, text: str) -> None:
    assert parse_runtime_load(kind, text) is None
