"""Pure decisions about LoRA adapters: the flags a base model's engine starts with so that
its adapters can load, and which adapters an engine unloads."""

from __future__ import annotations

from collections.abc import Sequence

# The ranks vLLM's --max-lora-rank takes.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_MAX_LORAS = 4


def engine_lora_rank(rank: int) -> int | None:
    """The smallest --max-lora-rank vLLM takes that fits an adapter of `rank`; None: none does."""
    return next((allowed for allowed in VLLM_LORA_RANKS if allowed >= rank), None)


def lora_flags(
    operator_args: Sequence[str], adapter_ranks: Sequence[int], max_loras: int
) -> tuple[str, ...]:
    """What an engine of a base model starts with so its adapters can load at run time: LoRA
    on, room for `max_loras` of them and a rank that fits the largest. Nothing without
    adapters; a flag the operator gave (in engine_args) is theirs and not repeated."""
    if not adapter_ranks:
        return ()
    given = {
        arg.partition("=")[0] for arg in operator_args if isinstance(arg, str) and arg[:2] == "--"
    }
    rank = engine_lora_rank(max(adapter_ranks)) or VLLM_LORA_RANKS[-1]
    flags: list[str] = []
    for flag, value in (
        ("--enable-lora", None),
        ("--max-loras", str(max_loras)),
        ("--max-lora-rank", str(rank)),
    ):
        if flag not in given:
            flags += [flag] if value is None else [flag, value]
    return tuple(flags)


def operator_lora_rank(operator_args: Sequence[str]) -> int | None:
    """The --max-lora-rank an operator set in a base model's engine_args, if any (validation
    reports engine_args that are not all strings; here they name no rank)."""
    items = [arg for arg in operator_args if isinstance(arg, str)]
    for index, arg in enumerate(items):
        name, sep, value = arg.partition("=")
        if name != "--max-lora-rank":
            continue
        value = value if sep else (items[index + 1] if index + 1 < len(items) else "")
        return int(value) if value.isdigit() else None
    return None


def idle_adapters(
    adapters: dict[str, dict[str, object]], keep_alive: dict[str, float], now: float
) -> list[str]:
    """The adapters of one engine to unload: no request in flight and idle past their own
    keep_alive (seconds, by adapter id). One not in `keep_alive` is no longer in the catalog
    (deleted while its unload could not reach the engine): it goes as soon as it is idle."""
    idle = []
    for adapter_id, facts in adapters.items():
        seconds = keep_alive.get(adapter_id, 0.0)
        last_used = facts.get("last_used_at")
        if facts.get("requests_in_flight"):
            continue
        if adapter_id not in keep_alive or (
            isinstance(last_used, int | float) and now - last_used >= seconds
        ):
            idle.append(adapter_id)
    return sorted(idle)
