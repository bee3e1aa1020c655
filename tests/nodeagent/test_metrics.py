from __future__ import annotations

from nodeagent.metrics import parse_engine_metrics

NEW = """
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 200.0
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 50.0
"""

OLD = """
vllm:num_requests_running{model_name="m"} 1.0
vllm:num_requests_waiting{model_name="m"} 0.0
vllm:gpu_cache_usage_perc{model_name="m"} 0.5
vllm:gpu_prefix_cache_queries_total{model_name="m"} 10.0
vllm:gpu_prefix_cache_hits_total{model_name="m"} 9.0
"""


def test_current_vllm_metric_names():
    stats = parse_engine_metrics(NEW)
    assert (stats.requests_running, stats.requests_waiting, stats.kv_cache_usage) == (3, 2, 0.25)
    assert stats.kv_cache_hit_rate == 0.25


def test_older_vllm_metric_names():
    stats = parse_engine_metrics(OLD)
    assert (stats.requests_running, stats.kv_cache_usage, stats.kv_cache_hit_rate) == (1, 0.5, 0.9)


def test_several_engines_are_summed_and_missing_series_are_none():
    text = 'vllm:num_requests_running{engine="0"} 1\nvllm:num_requests_running{engine="1"} 2\n'
    stats = parse_engine_metrics(text)
    assert stats.requests_running == 3
    assert (stats.kv_cache_usage, stats.kv_cache_hit_rate) == (None, None)


def test_the_time_to_first_token_histogram_is_summed_bucket_by_bucket():
    text = (
        "".join(
            f'vllm:time_to_first_token_seconds_bucket{{engine="{e}",le="{le}"}} {n}\n'
            for e in (0, 1)
            for le, n in (("0.01", 1), ("0.1", 3), ("+Inf", 4))
        )
        + 'vllm:time_to_first_token_seconds_sum{engine="0"} 0.5\n'
    )
    stats = parse_engine_metrics(text)
    assert stats.ttft_buckets == ((0.01, 2.0), (0.1, 6.0), (float("inf"), 8.0))
    assert stats.ttft_sum == 0.5
    assert parse_engine_metrics(NEW).ttft_buckets == ()
