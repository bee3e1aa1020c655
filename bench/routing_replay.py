"""Cache-aware routing's home rule, offline: bench/routing.py's workload replayed through the
real decision (`choose_cached_replica`, `PrefixIndex`, `Traffic`) and four of the sim
engine's prefix caches, in a second per run instead of minutes, over several seeds and hash
keys.

    .venv/bin/python bench/routing_replay.py [--seeds 7 8 9] [--quick]

Each request goes, in order, where cache_aware with one web process sends it, and its
prompt is served by that engine's cache (`PrefixCache`, as the sim's). No time passes and
no request waits, so load never moves a request off its prefix here; what differs between
the rules is only where new prefixes make their home:

- `plain`: rendezvous hashing on the prefix's first chunk;
- `bound_all`: bounded by each replica's recent share of all prompt chunks sent (the rule
  before 2026-12-07, evening);
- `bound_new`: bounded by each replica's share of chunks new to it (`PrefixIndex.record`),
  what its cache took in: the product's rule.

Each is run for every seed and for several model keys (the key salts the homes' hashing,
so each is another draw of where the hottest prompts land). Reported: each rule's mean and
worst hit ratio, the oracle's (one cache as large as all four), and the max/mean of the
prefill each engine did (the prompt tokens it missed). The live figures come from
bench/routing.py; this shows which rule is better over many draws, which one live run
cannot.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from routing_traffic import (  # noqa: E402
    BLOCK_TOKENS,
    ENGINES,
    Sizes,
    max_over_mean,
    oracle_hit_ratio,
    sim_tokens,
    workload,
)

from agents.scheduling import HomeBound, ReplicaLoad, choose_cached_replica  # noqa: E402
from controlplane.gateway.apis import Api  # noqa: E402
from controlplane.gateway.prefix import Prefix, PrefixIndex, Traffic, prefix_of  # noqa: E402
from nodeagent.engines.simcache import PrefixCache  # noqa: E402

SEATS = 256  # the sims' max_num_seqs, as bench/routing.py registers them
HASH_KIB, INDEX_MIB, BALANCE, BALANCE_SHARE = 64, 8, 4, 0.25  # the settings' defaults
REQUESTS_PER_SECOND = 600.0  # about bench/routing.py's rate: how fast Traffic decays here
# The gateway keys a model's prefixes by its row's id: "2" is the live benchmark's cache_aware
# model (its second fleet), so the first draw here is the one bench/routing.py makes.
KEYS = ("2", "a", "b", "c")

# What a replica's traffic grows by when a prefix is sent to it: (the prefix, what
# PrefixIndex.record said was new to it) → chunks.
Counting = Callable[[Prefix, int], int]
RULES: dict[str, tuple[float | None, Counting]] = {
    "plain": (None, lambda prefix, new: 0),
    "bound_all": (1.25, lambda prefix, new: len(prefix.chunks)),
    "bound_new": (1.00, lambda prefix, new: new),
}


def replay(order: list[list[dict[str, str]]], sizes: Sizes, key: str, factor: float | None,
           counting: Counting) -> tuple[float, float]:  # fmt: skip
    """The engines' hit ratio, and the max/mean of the prefill each did."""
    caches = {str(n): PrefixCache(BLOCK_TOKENS, sizes.cache_blocks) for n in range(ENGINES)}
    index, traffic = PrefixIndex.of_mib(INDEX_MIB), Traffic()
    bound = HomeBound(factor, Traffic.MIN_TOTAL) if factor is not None else None
    hits = queries = 0
    missed = dict.fromkeys(caches, 0)
    for number, messages in enumerate(order):
        now = number / REQUESTS_PER_SECOND
        prefix = prefix_of(Api.CHAT, {"messages": messages}, key, HASH_KIB * 1024)
        loads = [ReplicaLoad(k, seats=SEATS, traffic=traffic.of(k, now)) for k in caches]
        found = choose_cached_replica(loads, index.match(prefix, caches), prefix.home,
                                      balance=BALANCE, balance_share=BALANCE_SHARE,
                                      home_bound=bound)  # fmt: skip
        assert found is not None
        chosen = found[0].key
        if prefix.chunks:
            traffic.add(chosen, counting(prefix, index.record(prefix, chosen)), now)
        tokens = sim_tokens(messages)
        hit = caches[chosen].serve(tokens, key)
        hits, queries = hits + hit, queries + len(tokens)
        missed[chosen] += len(tokens) - hit
    return hits / queries, max_over_mean(list(missed.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[7, 8, 9])
    parser.add_argument("--cache-blocks", type=int, default=3000, help="per engine")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one seed (CI)")
    args = parser.parse_args()
    sizes = Sizes(300, 400, 1500, 4, args.cache_blocks, 0.05, 8)
    keys: tuple[str, ...] = KEYS
    if args.quick:
        sizes, args.seeds, keys = Sizes(8, 64, 16, 2, 16, 0.05, 8), [7], KEYS[:1]
    results: dict[str, list[tuple[float, float]]] = {rule: [] for rule in RULES}
    oracles = []
    for seed in args.seeds:
        order = workload(sizes, seed)
        oracles.append(oracle_hit_ratio(order, sizes))
        for key in keys:
            for rule, (factor, counting) in RULES.items():
                results[rule].append(replay(order, sizes, key, factor, counting))
            line = " ".join(f"{rule}={results[rule][-1][0]:.4f}" for rule in RULES)
            print(f"seed {seed} key {key!r}: {line}", flush=True)
    fields = [f"hit_oracle={statistics.mean(oracles):.4f}"]
    for rule, runs in results.items():
        ratios = [hit for hit, _ in runs]
        fields += [f"hit_{rule}={statistics.mean(ratios):.4f}",
                   f"hit_{rule}_worst={min(ratios):.4f}",
                   f"prefill_imbalance_{rule}={max(imbalance for _, imbalance in runs):.2f}"]  # fmt: skip
    print("RESULT " + " ".join(fields))


if __name__ == "__main__":
    main()
