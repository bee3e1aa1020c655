"""Cache-aware routing's parts: a request's prefix, the index of where prefixes were sent, and
the choice between a replica holding the prefix and the least loaded one."""

from __future__ import annotations

import time
import tracemalloc

from agents.scheduling import (
    HomeBound,
    ReplicaLoad,
    RouteReason,
    choose_cached_replica,
    home_replica,
    prefix_allowance,
    rendezvous_replica,
    rendezvous_weight,
)
from controlplane.gateway.apis import Api
from controlplane.gateway.prefix import CHUNK_BYTES, HOLDERS, PrefixIndex, Traffic, prefix_of

SYSTEM = "You are a careful assistant for the fleet's operators. " * 40  # about 2.2 KB
CAP = 64 * 1024


def chat(*messages: tuple[str, object], **extra: object) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in messages], **extra}


def test_requests_sharing_a_system_prompt_share_its_chunks_and_their_home():
    one = prefix_of(Api.CHAT, chat(("system", SYSTEM), ("user", "first question")), "7", CAP)
    two = prefix_of(Api.CHAT, chat(("system", SYSTEM), ("user", "another one")), "7", CAP)
    shared = len(SYSTEM.encode()) // CHUNK_BYTES
    assert one.chunks[:shared] == two.chunks[:shared]
    assert one.home == two.home is not None
    # A later turn of the conversation extends the earlier turn's chain.
    turn = chat(("system", SYSTEM), ("user", "first question"), ("assistant", "x" * 600),
                ("user", "and then?"))  # fmt: skip
    later = prefix_of(Api.CHAT, turn, "7", CAP)
    assert later.chunks[: len(one.chunks)] == one.chunks


def test_an_adapter_and_another_model_have_prefixes_of_their_own():
    body = chat(("system", SYSTEM))
    base, adapter, other = (prefix_of(Api.CHAT, body, key, CAP) for key in ("7", "7:org/a", "8"))
    assert not set(base.chunks) & set(adapter.chunks)
    assert not set(base.chunks) & set(other.chunks)
    assert len({base.home, adapter.home, other.home}) == 3


def test_the_order_of_the_prompt_is_the_order_the_engine_reads():
    swapped = prefix_of(Api.CHAT, chat(("user", SYSTEM), ("system", SYSTEM)), "7", CAP)
    plain = prefix_of(Api.CHAT, chat(("system", SYSTEM), ("user", SYSTEM)), "7", CAP)
    assert swapped.home != plain.home  # roles are part of it
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"x": SYSTEM}}}]
    with_tools = prefix_of(Api.CHAT, chat(("system", SYSTEM), tools=tools), "7", CAP)
    assert with_tools.home != plain.home  # tools come first


def test_a_huge_odd_prompt_is_hashed_within_the_cap_and_never_fails():
    huge = "é😀\u202e\ud800" + "z" * 1_000_000  # accents, emoji, RTL override, lone surrogate
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 500_000}}
    body = chat(("system", huge), ("user", [{"type": "text", "text": "look"}, image]))
    started = time.perf_counter()
    prefix = prefix_of(Api.CHAT, body, "7", CAP)
    assert len(prefix.chunks) == CAP // CHUNK_BYTES
    assert time.perf_counter() - started < 1.0  # not a benchmark: only "not the whole prompt"
    assert prefix_of(Api.CHAT, body, "7", CAP) == prefix  # the same request, the same prefix
    for junk in ({"messages": "nope"}, {"messages": [1, None, {"content": 5}]}, {}):
        prefix_of(Api.CHAT, junk, "7", CAP)
    assert prefix_of(Api.CHAT, chat(("user", "hi")), "7", CAP).chunks == ()  # under a chunk


def test_completions_and_responses_read_their_prompts_and_embeddings_have_none():
    completion = prefix_of(Api.COMPLETIONS, {"prompt": SYSTEM}, "7", CAP)
    assert len(completion.chunks) == len(SYSTEM.encode()) // CHUNK_BYTES
    tokens = prefix_of(Api.COMPLETIONS, {"prompt": list(range(2000))}, "7", CAP)
    assert tokens.chunks
    response = prefix_of(Api.RESPONSES, {"instructions": SYSTEM, "input": "q"}, "7", CAP)
    items = prefix_of(Api.RESPONSES, {"instructions": SYSTEM, "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "q"}]}]}, "7", CAP)  # fmt: skip
    assert response.home == items.home is not None
    assert prefix_of(Api.EMBEDDINGS, {"input": SYSTEM}, "7", CAP).chunks == ()


def test_the_index_finds_the_longest_run_each_live_replica_holds():
    index = PrefixIndex(1000)
    short = prefix_of(Api.COMPLETIONS, {"prompt": SYSTEM[:1100]}, "7", CAP)
    long = prefix_of(Api.COMPLETIONS, {"prompt": SYSTEM}, "7", CAP)
    assert long.chunks[: len(short.chunks)] == short.chunks
    index.record(short, "a")
    index.record(long, "b")
    assert index.match(long, {"a", "b"}) == {"a": len(short.chunks), "b": len(long.chunks)}
    assert index.match(long, {"a"}) == {"a": len(short.chunks)}  # b is gone: not counted
    assert index.match(long, set()) == {}
    other = prefix_of(Api.COMPLETIONS, {"prompt": SYSTEM}, "8", CAP)
    assert index.match(other, {"a", "b"}) == {}


def test_recording_says_how_many_chunks_were_new_to_the_replica():
    """What a replica's cache had to take in: a hit's chunks are not new, a longer prompt's
    tail is, and so is all of it on another replica or on one pushed out of the holders."""
    index = PrefixIndex(1000)
    short = prefix_of(Api.COMPLETIONS, {"prompt": SYSTEM[:1100]}, "7", CAP)
    long = prefix_of(Api.COMPLETIONS, {"prompt": SYSTEM}, "7", CAP)
    assert index.record(short, "a") == len(short.chunks) > 0
    assert index.record(short, "a") == 0
    assert index.record(long, "a") == len(long.chunks) - len(short.chunks) > 0
    assert index.record(long, "b") == len(long.chunks)
    assert index.record(long, "a") == 0  # still a holder, though not the latest
    for replica in ["c", "d", "e"]:
        assert index.record(short, replica) == len(short.chunks)
    assert index.record(short, "b") == len(short.chunks)  # the oldest of HOLDERS: out


def test_the_index_keeps_the_latest_holders_first_and_stays_within_its_bound():
    index = PrefixIndex(1000)
    prefix = prefix_of(Api.COMPLETIONS, {"prompt": SYSTEM}, "7", CAP)
    for replica in ["r0", "r1", "r2", "r3", "r4", "r1"]:
        index.record(prefix, replica)
    holders = index.entries["7", prefix.chunks[0]]
    assert holders[0] == "r1"
    assert len(holders) == HOLDERS
    assert "r0" not in holders  # the oldest went
    small = PrefixIndex(10)
    for n in range(50):
        small.record(prefix_of(Api.COMPLETIONS, {"prompt": f"{n} {SYSTEM}"}, "7", CAP), "a")
        assert len(small.entries) <= 10
    latest = prefix_of(Api.COMPLETIONS, {"prompt": f"49 {SYSTEM}"}, "7", CAP)
    assert small.match(latest, {"a"})  # the most recent survived
    assert PrefixIndex.of_mib(8).max_entries > 20_000  # about 21,000


def load(key: str, in_flight: int = 0, waiting: int = 0) -> ReplicaLoad:
    return ReplicaLoad(key, in_flight, waiting, None)


def chosen_key(pool: list[ReplicaLoad], matched: dict[str, int], home: str | None) -> str:
    found = choose_cached_replica(pool, matched, home, balance=4)
    assert found is not None
    return found[0].key


def test_the_balance_is_a_share_of_the_replicas_seats_where_that_is_more():
    assert prefix_allowance(ReplicaLoad("a", seats=256), 4, 0.25) == 64
    assert prefix_allowance(ReplicaLoad("a", seats=8), 4, 0.25) == 4
    assert prefix_allowance(ReplicaLoad("a"), 4, 0.25) == 4  # seats not known: the floor
    big = [ReplicaLoad("a", 40, seats=256), ReplicaLoad("b", 0, seats=256)]
    assert choose_cached_replica(big, {"a": 3}, "h", balance=4, balance_share=0.25) == (
        big[0], RouteReason.PREFIX)  # fmt: skip
    small = [ReplicaLoad("a", 40, seats=32), ReplicaLoad("b", 0, seats=32)]
    found = choose_cached_replica(small, {"a": 3}, "h", balance=4, balance_share=0.25)
    assert found == (small[1], RouteReason.FALLBACK)  # 40 past 8 (a quarter of 32)


def test_the_longest_match_wins_while_within_the_balance():
    pool = [load("a", 3), load("b", 1), load("c", 0)]
    assert choose_cached_replica(pool, {"a": 4, "b": 2}, "h", balance=4) == (
        pool[0], RouteReason.PREFIX)  # fmt: skip
    # a is 6 busier than the least loaded: past the balance, so another takes it, the same
    # from every web process (the home's rendezvous order among those within the balance).
    busy = [load("a", 6), load("b", 1), load("c", 0)]
    spilled = choose_cached_replica(busy, {"a": 4}, "h", balance=4)
    assert spilled is not None
    assert spilled[0].key in {"b", "c"}
    assert spilled[1] is RouteReason.FALLBACK
    assert choose_cached_replica(list(reversed(busy)), {"a": 4}, "h", balance=4) == spilled
    # A replica holding a little less of it, within the balance, beats one holding none.
    near = [load("a", 6), load("b", 1), load("c", 0)]
    assert choose_cached_replica(near, {"a": 10, "b": 9}, "h", balance=4) == (
        near[1], RouteReason.PREFIX)  # fmt: skip
    # The user's replica is no way out for a busy holder: it must be within the balance too.
    users = [load("a", 0), load("b", 5), load("c", 7)]
    session_home = max(users, key=lambda r: rendezvous_weight("u", r.key)).key
    found = choose_cached_replica(users, {"b": 10}, "h", "u", balance=4)
    assert found is not None
    assert found[0].key == "a"  # the only one within the balance
    assert found[1] is (RouteReason.SESSION if session_home == "a" else RouteReason.FALLBACK)
    # Equal matches: the less loaded of them.
    assert chosen_key(pool, {"a": 4, "b": 4}, "h") == "b"


def test_a_new_prefix_goes_to_its_home_from_every_process_alike():
    pool = [load(key) for key in "abcd"]
    homes = {chosen_key(pool, {}, f"home-{n}") for n in range(40)}
    assert len(homes) == 4  # homes spread over the replicas
    for n in range(10):
        first = choose_cached_replica(pool, {}, f"home-{n}", balance=4)
        again = choose_cached_replica(list(reversed(pool)), {}, f"home-{n}", balance=4)
        assert first == again
        assert first is not None
        assert first[1] is RouteReason.PREFIX
    # A home far busier than the least loaded is not taken: the next in its order is.
    home = chosen_key(pool, {}, "home-0")
    crowded = [load(r.key, 10 if r.key == home else 0) for r in pool]
    chosen = choose_cached_replica(crowded, {}, "home-0", balance=4)
    assert chosen is not None
    assert chosen[0].key != home
    assert chosen[1] is RouteReason.FALLBACK
    assert choose_cached_replica(list(reversed(crowded)), {}, "home-0", balance=4) == chosen


def test_a_new_prefixs_home_skips_replicas_past_the_traffic_bound():
    bound = HomeBound(factor=1.25, min_total=100)
    plain = [ReplicaLoad(key) for key in "abcd"]
    home = home_replica(plain, "p").key
    assert home == rendezvous_replica(plain, "p").key
    order = sorted("abcd", key=lambda k: -rendezvous_weight("p", k))
    # The home has drawn twice its share: past 1.25x the mean, the next in order takes it.
    busy = [ReplicaLoad(k, traffic=200 if k == home else 100) for k in "abcd"]
    assert home_replica(busy, "p", bound).key == order[1]
    assert home_replica(list(reversed(busy)), "p", bound).key == order[1]  # any order alike
    found = choose_cached_replica(busy, {}, "p", balance=4, home_bound=bound)
    assert found == (busy["abcd".index(order[1])], RouteReason.PREFIX)
    # Within the bound, or with too little traffic to judge, the plain home.
    even = [ReplicaLoad(k, traffic=110 if k == home else 100) for k in "abcd"]
    assert home_replica(even, "p", bound).key == home
    few = [ReplicaLoad(k, traffic=20 if k == home else 10) for k in "abcd"]
    assert home_replica(few, "p", bound).key == home
    # Every replica past it (it cannot be, but a factor under 1 may): the plain home.
    assert home_replica(busy, "p", HomeBound(factor=0.1, min_total=0)).key == home
    # A prefix some replica holds is not moved by the bound.
    assert choose_cached_replica(busy, {home: 2}, "p", balance=4, home_bound=bound) == (
        busy["abcd".index(home)], RouteReason.PREFIX)  # fmt: skip


def test_traffic_halves_every_half_life_and_forgets_the_faded():
    traffic = Traffic()
    traffic.add("a", 8, now=0.0)
    traffic.add("a", 8, now=0.0)
    assert traffic.of("a", 0.0) == 16
    assert traffic.of("a", Traffic.HALF_LIFE) == 8
    assert traffic.of("b", 5.0) == 0
    for n in range(5000):
        traffic.add(str(n), 1, now=float(n))
    assert len(traffic.volumes) <= 4097


def test_without_a_prefix_the_session_rule_decides():
    pool = [load(key) for key in "abcd"]
    chosen = choose_cached_replica(pool, {}, None, "user-42", balance=4)
    assert chosen is not None
    assert chosen[1] is RouteReason.SESSION
    assert chosen == choose_cached_replica(pool, {}, None, "user-42", balance=4)
    assert choose_cached_replica([], {}, "h", balance=4) is None


def test_an_index_of_one_mib_stays_within_it_however_much_it_is_fed():
    index = PrefixIndex.of_mib(1)
    prompts = [
        prefix_of(Api.COMPLETIONS, {"prompt": f"{n} {SYSTEM}"}, "7", CAP) for n in range(3000)
    ]
    tracemalloc.start()
    try:
        for n, prefix in enumerate(prompts):
            index.record(prefix, f"replica-{n % 4}")
            index.record(prefix, f"replica-{(n + 1) % 4}")
        used, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(index.entries) == index.max_entries  # full, and evicting
    assert used <= 1024 * 1024


def test_deep_json_and_long_adapter_names_route_apart_without_failing():
    deep: object = "x"
    for _ in range(5000):
        deep = [deep]
    body = chat(("system", SYSTEM), tools=deep)
    assert prefix_of(Api.CHAT, body, "7", CAP).chunks  # routed by its other pieces
    long = "org/" + "a" * 80
    one = prefix_of(Api.CHAT, chat(("system", SYSTEM)), f"7:{long}-one", CAP)
    two = prefix_of(Api.CHAT, chat(("system", SYSTEM)), f"7:{long}-two", CAP)
    assert one.home != two.home


def test_the_index_evicts_a_prefixs_end_before_its_start():
    prefix = prefix_of(Api.COMPLETIONS, {"prompt": SYSTEM}, "7", CAP)
    index = PrefixIndex(len(prefix.chunks))
    index.record(prefix, "a")
    index.record(prefix_of(Api.COMPLETIONS, {"prompt": "other " * 200}, "7", CAP), "b")
    kept = index.match(prefix, {"a"})
    assert kept.get("a", 0) >= 1  # its first chunk survived: a shorter match, not none
