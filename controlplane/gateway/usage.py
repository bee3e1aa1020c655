"""Usage, gathered in memory and written in batches (gateway.batches), so no request waits
on a database write: one upsert per key and model every `GATEWAY_USAGE_FLUSH_SECONDS`."""

from __future__ import annotations

from controlplane.gateway.actions import record_usage
from controlplane.gateway.batches import Batches


class UsageBuffer(Batches[tuple[int, str]]):
    """Per (key, model_id): requests, prompt tokens, completion tokens."""

    width = 3
    what = "usage of (key, model)"

    def add(self, key_id: int, model_id: str, prompt: int, completion: int) -> None:
        counts = self.counts((key_id, model_id))
        counts[0] += 1
        counts[1] += prompt
        counts[2] += completion

    async def write(self, key: tuple[int, str], counts: list[float]) -> None:
        requests, prompt, completion = (int(count) for count in counts)
        await record_usage(*key, prompt, completion, requests=requests)
