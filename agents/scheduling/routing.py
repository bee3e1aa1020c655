"""Pure decisions of routing: which READY replica a request goes to, and why.

Scores come from the gateway's own in-flight counts and the engines' queues
(`ReplicaLoad`); a session or a prompt prefix keeps to one replica by rendezvous
hashing, so that every web process chooses alike without sharing any state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum


@dataclass(frozen=True)
class ReplicaLoad:
    """What routing knows of one READY replica: the gateway's own count of requests it has in
    flight there, and the engine's queue and KV-cache use from the last heartbeat."""

    key: str
    in_flight: int = 0
    waiting: int = 0
    kv_cache_usage: float | None = None
    seats: int = 0  # the engine's concurrent sequences (max_num_seqs); 0: not known
    # The new prompt this web process sent it lately (chunks its cache had to take in,
    # decayed): bounds its share of new prefixes.
    traffic: float = 0.0


def replica_score(replica: ReplicaLoad) -> float:
    """Lower is better. A queued request weighs double (it has not started); a full KV cache
    adds one request's worth, so it breaks ties between equally busy replicas."""
    return replica.in_flight + 2 * replica.waiting + (replica.kv_cache_usage or 0.0)


def prefix_allowance(replica: ReplicaLoad, balance: float, share: float) -> float:
    """How much busier than the least loaded a replica holding a request's prefix may be and
    still get it: `balance`, or `share` of its engine's seats where that is more (`share`
    already divided among the web processes, whose load scores count their own requests).
    What a replica can take before it slows grows with its seats: four more requests are
    half of an 8-sequence engine and nothing to one running 256, where a prefix's prefill
    saved is the same on both."""
    return max(balance, share * replica.seats)


def rendezvous_weight(session: str, replica_key: str) -> int:
    """Highest-random-weight hashing: a session's replica changes only when that replica goes."""
    digest = hashlib.blake2b(f"{session}\0{replica_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_replica(replicas: Sequence[ReplicaLoad], key: str) -> ReplicaLoad:
    """`key`'s replica by highest-random-weight hashing (a session's, a prefix's home)."""
    return max(replicas, key=lambda replica: rendezvous_weight(key, replica.key))


@dataclass(frozen=True)
class HomeBound:
    """Consistent hashing with bounded loads (Mirrokni et al.; HAProxy's hash-balance-factor)
    for a new prefix's home: the first replica in the prefix's rendezvous order whose recent
    new prompt traffic (what its cache had to take in) is at most `factor` times the
    replicas' mean. Plain rendezvous hashing leaves where the few hottest prefixes land to
    chance, and a replica drawing two of them takes twice its share of the conversations
    that follow, whose KV its cache then cannot keep. The bound applies once the replicas'
    traffic adds up to `min_total`: below it the shares are noise, and two web processes
    would act on different noise."""

    factor: float
    min_total: float


def home_replica(
    replicas: Sequence[ReplicaLoad], key: str, bound: HomeBound | None = None
) -> ReplicaLoad:
    """A prefix's home: `key`'s rendezvous replica, or under `bound`, the first in its
    rendezvous order not past the bound (the first of all when every one is)."""
    total = sum(replica.traffic for replica in replicas)
    if bound is None or total < bound.min_total:
        return rendezvous_replica(replicas, key)
    ranked = sorted(replicas, key=lambda replica: -rendezvous_weight(key, replica.key))
    limit = bound.factor * total / len(replicas)
    return next((replica for replica in ranked if replica.traffic <= limit), ranked[0])


def choose_replica(
    replicas: Sequence[ReplicaLoad], session: str | None = None, *, overload: float = 8.0
) -> ReplicaLoad | None:
    """The replica to send a request to; None when there is none.

    With a session key (the request's `user`), its rendezvous replica while that one's
    score stays under `overload`; otherwise, or without a key, the least loaded, ties broken
    by the same hashing so that equal replicas share the work deterministically.
    """
    if not replicas:
        return None
    if session:
        preferred = rendezvous_replica(replicas, session)
        if replica_score(preferred) < overload:
            return preferred
    salt = session or ""
    return min(replicas, key=lambda r: (replica_score(r), -rendezvous_weight(salt, r.key)))


class RouteReason(StrEnum):
    """Why a warm request went where it went (llmfleet_routing_decisions_total's `reason`)."""

    PREFIX = "prefix"  # a replica that holds (or is the home of) the request's prefix
    LOAD = "load"  # no replica holds it: the least loaded
    SESSION = "session"  # the `user`'s own replica
    FALLBACK = "fallback"  # one holds it, but is too much busier than the least loaded


def choose_cached_replica(
    replicas: Sequence[ReplicaLoad],
    matched: Mapping[str, int],
    home: str | None,
    session: str | None = None,
    *,
    balance: float,
    balance_share: float = 0.0,
    home_bound: HomeBound | None = None,
    overload: float = 8.0,
) -> tuple[ReplicaLoad, RouteReason] | None:
    """Cache-aware routing: where the request's prompt prefix most likely is in an engine's KV
    cache, among the replicas whose load score is within their allowance of the least loaded
    (`prefix_allowance`: `balance`, or `balance_share` of the replica's seats if more).

    `matched` is how many leading chunks of the prefix each replica was last sent (the
    gateway's index): among those within the balance, the longest match wins, ties to the
    less loaded, then to `home`'s rendezvous order. With no match anywhere, `home` (the
    prefix's first chunk, as a key) picks a replica by rendezvous hashing, bounded by
    `home_bound` (`home_replica`): every web process sends a new prefix to the same replica
    without sharing any state (the bound, where given, by the traffic this process sent:
    `HomeBound`). When the replicas holding the prefix (or its home) are all too busy, the
    request goes to the next replica in the home's rendezvous order within the balance (the
    same from every web process where no bound applies), or, with a session key, to the
    session rule's choice within the balance (`choose_replica`).
    """
    if not replicas:
        return None
    least = min(replica_score(replica) for replica in replicas)
    eligible = [
        replica
        for replica in replicas
        if replica_score(replica) - least <= prefix_allowance(replica, balance, balance_share)
    ]
    salt = home or session or ""
    holders = [replica for replica in eligible if matched.get(replica.key, 0) > 0]
    if holders:
        best = max(holders, key=lambda r: (matched[r.key], -replica_score(r),
                                            rendezvous_weight(salt, r.key)))  # fmt: skip
        return best, RouteReason.PREFIX
    held = any(matched.get(replica.key, 0) > 0 for replica in replicas)
    if home is not None and not held:
        first = home_replica(replicas, home, home_bound)
        if any(replica.key == first.key for replica in eligible):
            return first, RouteReason.PREFIX
    declined = RouteReason.FALLBACK if held or home is not None else RouteReason.LOAD
    if home is not None and not session:
        return home_replica(eligible, home, home_bound), declined
    chosen = choose_replica(eligible, session, overload=overload)
    assert chosen is not None
    return chosen, session_or(declined, chosen, replicas, session)


def session_or(
    reason: RouteReason, chosen: ReplicaLoad, replicas: Sequence[ReplicaLoad], session: str | None
) -> RouteReason:
    """SESSION when `chosen` is the session's own replica among `replicas`, else `reason`."""
    if session and chosen.key == rendezvous_replica(replicas, session).key:
        return RouteReason.SESSION
    return reason


def choose_adapter_replica(
    holding: Sequence[ReplicaLoad],
    others: Sequence[ReplicaLoad],
    session: str | None,
    *,
    overload: float,
) -> ReplicaLoad | None:
    """Where an adapter's request goes: a base replica that holds the adapter (nothing to
    load), unless every such one is at `overload` and another base replica is less loaded;
    then that one, which loads it (an adapter scales out onto more base replicas, never into
    a new engine). With no replica holding it, the least loaded base replica."""
    held = choose_replica(holding, session)
    if held is not None and (replica_score(held) < overload or not others):
        return held
    other = choose_replica(others, session)
    if held is None or other is None:
        return other or held
    return other if replica_score(other) < replica_score(held) else held
