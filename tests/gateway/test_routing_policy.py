"""The router's choice under each GATEWAY_ROUTING_POLICY, adapters included."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from agents.models import Placement
from agents.scheduling import RouteReason
from controlplane.gateway.apis import Api
from controlplane.gateway.prefix import Traffic, prefix_of
from controlplane.gateway.router import Router

SYSTEM = "Answer as the fleet's runbook says. " * 60


def replicas(*adapters: dict, seats: int = 8) -> list[Placement]:
    now = datetime(2026, 12, 6, tzinfo=UTC)
    return [
        Placement(
            pk=n + 1,
            adapters=held,
            requests_waiting=0,
            kv_cache_usage=None,
            max_num_seqs=seats,
            updated_at=now,
        )
        for n, held in enumerate(adapters)
    ]


def prefix(key: str = "7", user: str = "q"):
    body = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]}
    return prefix_of(Api.CHAT, body, key, 65536)


def system(text: str):
    return prefix_of(Api.CHAT, {"messages": [{"role": "system", "content": text}]}, "7", 65536)


def router() -> Router:
    return Router(state=None)  # type: ignore[arg-type]  # pick and the index use no state


def test_cache_aware_sends_a_prefix_where_it_went_and_away_when_that_one_is_busy(settings):
    settings.GATEWAY_ROUTING_POLICY, settings.GATEWAY_PREFIX_BALANCE = "cache_aware", 2
    route, pool = router(), replicas({}, {}, {}, {})
    first = route.pick(pool, None, prefix=prefix())
    assert first is not None
    assert first[1] is RouteReason.PREFIX  # its home
    route.prefixes.record(prefix(), str(first[0].pk))
    again = route.pick(pool, None, prefix=prefix(user="another question"))
    assert again == first  # the shared system prompt: the same replica
    route.in_flight[first[0].pk] = 3  # 3 busier than the others: past the balance of 2
    moved = route.pick(pool, None, prefix=prefix())
    assert moved is not None
    assert moved[0] != first[0]
    assert moved[1] is RouteReason.FALLBACK


def test_a_replica_with_more_seats_keeps_its_prefix_under_more_load(settings):
    """The balance grows with the engine's seats: 3 more requests push a prefix off an
    8-sequence engine (past the balance of 2), not off a 256-sequence one (25%: 64)."""
    settings.GATEWAY_ROUTING_POLICY, settings.GATEWAY_PREFIX_BALANCE = "cache_aware", 2
    settings.GATEWAY_PREFIX_BALANCE_PERCENT = 25
    settings.GATEWAY_UNKNOWN_MAX_NUM_SEQS = 8  # what a replica that does not say counts as
    for seats, stays in ((8, False), (256, True), (0, False)):
        route, pool = router(), replicas({}, {}, {}, {}, seats=seats)
        first = route.pick(pool, None, prefix=prefix())
        assert first is not None
        route.prefixes.record(prefix(), str(first[0].pk))
        route.in_flight[first[0].pk] = 3
        picked = route.pick(pool, None, prefix=prefix())
        assert picked is not None
        assert (picked[0] == first[0]) is stays


@pytest.mark.parametrize(("web_processes", "moves"), [(1, True), (2, False)])
def test_a_new_prefixs_home_is_bounded_by_traffic_where_web_processes_agree(
    settings, web_processes, moves
):
    """A home that drew far more than its share of recent traffic gives a new prefix to the
    next in its order, under cache_aware only where one web process sees everything."""
    settings.GATEWAY_ROUTING_POLICY, settings.GATEWAY_WEB_PROCESSES = "cache_aware", web_processes
    settings.GATEWAY_PREFIX_HOME_BOUND_PERCENT = 125
    route, pool = router(), replicas({}, {}, {}, {})
    home = route.pick(pool, None, prefix=prefix())
    assert home is not None
    now = time.monotonic()
    for placement in pool:  # the home at 4x the others, well past Traffic.MIN_TOTAL
        route.traffic.add(str(placement.pk), 1600 if placement == home[0] else 400, now)
    picked = route.pick(pool, None, prefix=prefix())
    assert picked is not None
    assert (picked[0] != home[0]) is moves
    assert picked[1] is RouteReason.PREFIX
    settings.GATEWAY_PREFIX_HOME_BOUND_PERCENT = 0  # off: the plain home
    assert route.pick(pool, None, prefix=prefix()) == home


def test_a_hot_prefixs_hits_leave_its_replica_room_for_new_prefixes(settings):
    """Traffic that bounds homes is what was new to a replica: the two hundredth request of
    one system prompt costs its replica nothing in cache, and does not push new prefixes
    away; the others, which took in more, are past the bound."""
    settings.GATEWAY_ROUTING_POLICY, settings.GATEWAY_WEB_PROCESSES = "cache_aware", 1
    settings.GATEWAY_PREFIX_HOME_BOUND_PERCENT = 100
    route, pool = router(), replicas({}, {}, {}, {})
    hot = system("the hot system prompt " * 2000)  # 44 KB: 85 chunks
    picked = route.pick(pool, None, prefix=hot)
    assert picked is not None
    for _ in range(200):  # its chunks sent 200 times, all hits after the first
        route.sent(hot, picked[0])
    now = time.monotonic()
    assert route.traffic.of(str(picked[0].pk), now) == pytest.approx(len(hot.chunks), rel=0.01)
    for placement in pool:  # about 4 x 54 new chunks on each of the others
        if placement != picked[0]:
            for n in range(4):
                route.sent(system(f"elsewhere {placement.pk} {n} " * 2000), placement)
    total = sum(route.traffic.of(str(placement.pk), now) for placement in pool)
    assert total > Traffic.MIN_TOTAL  # the bound applies
    homes = {route.pick(pool, None, prefix=system(f"new {n} " * 200))[0].pk
             for n in range(40)}  # fmt: skip
    # The hot replica alone is under the mean: every new prefix's home. Counting all chunks
    # sent, it would be far past it and take none.
    assert homes == {picked[0].pk}


@pytest.mark.parametrize(
    ("policy", "reason"), [("least_loaded", RouteReason.LOAD), ("session", RouteReason.SESSION)]
)
def test_the_other_policies_ignore_the_prefix(settings, policy, reason):
    settings.GATEWAY_ROUTING_POLICY = policy
    route, pool = router(), replicas({}, {}, {})
    route.prefixes.record(prefix(), "3")
    picked = route.pick(pool, "user-1", prefix=prefix())
    assert picked is not None
    assert picked[1] is reason


def test_an_adapters_prefix_is_followed_among_the_replicas_that_hold_it(settings):
    settings.GATEWAY_ROUTING_POLICY, settings.GATEWAY_PREFIX_BALANCE = "cache_aware", 2
    route = router()
    pool = replicas({}, {"org/a": {}}, {"org/a": {}}, {})
    adapter_prefix = prefix(key="7:org/a")
    route.prefixes.record(adapter_prefix, "3")
    picked = route.pick(pool, None, "org/a", adapter_prefix)
    assert picked is not None
    assert (picked[0].pk, picked[1]) == (3, RouteReason.PREFIX)
    # The base's own prefix on replica 1, which lacks the adapter: not followed for it.
    route.prefixes.record(prefix(), "1")
    other = route.pick(pool, None, "org/a", prefix(key="7:org/a", user="x"))
    assert other is not None
    assert other[0].pk in (2, 3)
