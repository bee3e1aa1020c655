"""The simulated engine's time to first token, as vLLM reports it.

`TtftHistogram` is vLLM's `vllm:time_to_first_token_seconds`: from a request's arrival to
its first token, with buckets finer than vLLM's below 200 ms. The sim observes the time it
models: its wait for a seat as it happened (which holds any lateness of the requests before
it, whose seats free as their sleeps end), then the prefill and first-token times it sets
(the prompt tokens its cache lacks, `ttft_ms`); not its own bookkeeping (reading the prompt
into its cache) nor how late its event loop wakes, which on a shared machine are the host's
doing (and, inside an agent, the share of the loop its proxy takes). Routing benchmarks
read their percentiles from it: what routing decides, whatever the hops in front of the
engines cost.
"""

from __future__ import annotations

import bisect

# vLLM's buckets above 200 ms; every 0.5 ms below 50 ms and every 5 ms to 200 ms, where a
# sim's prefills fall (a percentile is read to within a bucket).
BUCKETS: tuple[float, ...] = (
    *(round(0.0005 * n, 4) for n in range(1, 101)),
    *(round(0.05 + 0.005 * n, 3) for n in range(1, 31)),
    0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip


class TtftHistogram:
    """Counts per bucket, exposed cumulative, as Prometheus exposes a histogram."""

    def __init__(self) -> None:
        self.counts = [0] * len(BUCKETS)
        self.total = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.total += 1
        self.sum += seconds
        index = bisect.bisect_left(BUCKETS, seconds)  # the first bound at or above it
        if index < len(BUCKETS):
            self.counts[index] += 1

    def lines(self, labels: str) -> list[str]:
        """Its series in Prometheus' text format, under vLLM's name; `labels` without braces."""
        name = "vllm:time_to_first_token_seconds"
        out = [f"# TYPE {name} histogram"]
        running = 0
        for bound, count in zip(BUCKETS, self.counts, strict=True):
            running += count
            out.append(f'{name}_bucket{{{labels},le="{bound}"}} {running}')
        out.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.total}')
        out.append(f"{name}_count{{{labels}}} {self.total}")
        out.append(f"{name}_sum{{{labels}}} {self.sum}")
        return out
