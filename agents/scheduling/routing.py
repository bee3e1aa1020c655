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


def replica_score(replica: ReplicaLoad) -> float:
    """Lower is better. A queued request weighs double (it has not started); a full KV cache
    adds one request's worth, so it breaks ties between equally busy replicas."""
    return replica.in_flight + 2 * replica.waiting + (replica.kv_cache_usage or 0.0)


def rendezvous_weight(session: str, replica_key: str) -> int:
    """Highest-random-weight hashing: a session's replica changes only when that replica goes."""
    digest = hashlib.blake2b(f"{session}\0{replica_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_replica(replicas: Sequence[ReplicaLoad], key: str) -> ReplicaLoad:
    """`key`'s replica by highest-random-weight hashing (a session's, a prefix's home)."""
    return max(replicas, key=lambda replica: rendezvous_weight(key, replica.key))


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
    overload: float = 8.0,
) -> tuple[ReplicaLoad, RouteReason] | None:
    """Cache-aware routing: where the request's prompt prefix most likely is in an engine's KV
    cache, among the replicas whose load score is within `balance` of the least loaded.

    `matched` is how many leading chunks of the prefix each replica was last sent (the
    gateway's index): among those within the balance, the longest match wins, ties to the
    less loaded, then to `home`'s rendezvous order. With no match anywhere, `home` (the
    prefix's first chunk, as a key) picks a replica by rendezvous hashing: every web process
    sends a new prefix to the same replica without sharing any state. When the replicas
    holding the prefix (or its home) are all too busy, the request goes to the next replica
    in the home's rendezvous order within the balance (the same from every web process), or,
    with a session key, to the session rule's choice within the balance (`choose_replica`).
    """
    if not replicas:
        return None
    least = min(replica_score(replica) for replica in replicas)
    eligible = [replica for replica in replicas if replica_score(replica) - least <= balance]
    salt = home or session or ""
    holders = [replica for replica in eligible if matched.get(replica.key, 0) > 0]
    if holders:
        best = max(holders, key=lambda r: (matched[r.key], -replica_score(r),
                                            rendezvous_weight(salt, r.key)))  # fmt: skip
        return best, RouteReason.PREFIX
    held = any(matched.get(replica.key, 0) > 0 for replica in replicas)
    if home is not None:
        first = rendezvous_replica(replicas, home)
        if not held and any(replica.key == first.key for replica in eligible):
            return first, RouteReason.PREFIX
    declined = RouteReason.FALLBACK if held or home is not None else RouteReason.LOAD
    if home is not None and not session:
        return rendezvous_replica(eligible, home), declined
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
