"""Pure decisions about the fleet: no ORM writes, no I/O. `actions` applies them.

One module per concern; the names are the package's own, so that `scheduling.plan_load`
reads the same from wherever it is called:

- `health`: the state routing sees of an agent, and heartbeats missed;
- `routing`: which READY replica a request goes to, and why;
- `placement`: where a cold model can serve soonest, when to add a replica, when a batch
  may take capacity that is not idle;
- `adapters`: LoRA flags for a base model's engine, and the adapters it unloads;
- `eviction`: the ladder idle models step down;
- `admission`: who may start on a model's engines now, and in what order.
"""

from agents.scheduling.adapters import (
    DEFAULT_MAX_LORAS,
    VLLM_LORA_RANKS,
    engine_lora_rank,
    idle_adapters,
    lora_flags,
    operator_lora_rank,
)
from agents.scheduling.admission import (
    ADMISSION_CLASSES,
    lifted_counter,
    may_start,
    next_in_line,
    replica_seats,
)
from agents.scheduling.eviction import (
    AgentMemory,
    Demotion,
    PlacementFacts,
    excess_replicas,
    plan_sweep,
)
from agents.scheduling.health import (
    GpuSummary,
    effective_agent_state,
    health_verdict,
    missed_heartbeat_verdict,
    summarize_gpus,
)
from agents.scheduling.placement import (
    DEFAULT_BYTES_PER_SECOND,
    DEFAULT_ENGINE_START_SECONDS,
    DEFAULT_WAKE_SECONDS,
    DEMOTION_SECONDS,
    OBSERVATION_WEIGHT,
    LoadCandidate,
    LoadHistory,
    LoadPlan,
    Resident,
    batch_waits_for_idle,
    download_rate,
    estimate_ready_seconds,
    needs_scale_out,
    observe,
    plan_load,
    victims_for,
)
from agents.scheduling.routing import (
    HomeBound,
    ReplicaLoad,
    RouteReason,
    choose_adapter_replica,
    choose_cached_replica,
    choose_replica,
    home_replica,
    prefix_allowance,
    rendezvous_replica,
    rendezvous_weight,
    replica_score,
    session_or,
)

__all__ = [
    "ADMISSION_CLASSES",
    "DEFAULT_BYTES_PER_SECOND",
    "DEFAULT_ENGINE_START_SECONDS",
    "DEFAULT_MAX_LORAS",
    "DEFAULT_WAKE_SECONDS",
    "DEMOTION_SECONDS",
    "OBSERVATION_WEIGHT",
    "VLLM_LORA_RANKS",
    "AgentMemory",
    "Demotion",
    "GpuSummary",
    "HomeBound",
    "LoadCandidate",
    "LoadHistory",
    "LoadPlan",
    "PlacementFacts",
    "ReplicaLoad",
    "Resident",
    "RouteReason",
    "batch_waits_for_idle",
    "choose_adapter_replica",
    "choose_cached_replica",
    "choose_replica",
    "download_rate",
    "effective_agent_state",
    "engine_lora_rank",
    "estimate_ready_seconds",
    "excess_replicas",
    "health_verdict",
    "home_replica",
    "idle_adapters",
    "lifted_counter",
    "lora_flags",
    "may_start",
    "missed_heartbeat_verdict",
    "needs_scale_out",
    "next_in_line",
    "observe",
    "operator_lora_rank",
    "plan_load",
    "plan_sweep",
    "prefix_allowance",
    "rendezvous_replica",
    "rendezvous_weight",
    "replica_score",
    "replica_seats",
    "session_or",
    "summarize_gpus",
    "victims_for",
]
