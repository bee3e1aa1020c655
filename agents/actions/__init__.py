"""Every write to fleet state. Views, tasks and admin actions call these and write nothing else.

One module per concern:

- `registration`: agents joining and leaving, drain orders, what the gateway saw of a replica;
- `catalog`: the models clients may ask for (LoRA adapters among them);
- `adapters`: what the control plane keeps of adapters in engines, and idle ones' unloads;
- `coldstarts`: where a model loads (single flight per model), retries on the next agent;
- `loads`: the load task's start and outcome, and the first token that ends a cold start;
- `unloads`: steps down the eviction ladder and their outcome;
- `sweeps`: beat's sweep (orphaned steps, idle models, min_replicas);
- `heartbeats`: a heartbeat round, reconciled with what each agent reports;
- `progress`: the phases and bytes of pending loads, pushed by agents as they happen;
- `history`: counters and estimates kept as steps finish, and pruning;
- `steps`: the task protocol loads and unloads share.

Lock order, everywhere: model, then placements (by primary key), then agents (by primary
key), then load events. A function that locks says which rows in its docstring.
"""

from agents.actions.adapters import AdapterUnloadJob, adapter_unload_job, forget_adapter
from agents.actions.catalog import (
    ModelInUse,
    delete_model,
    orphan_unload_target,
    register_catalog_model,
)
from agents.actions.coldstarts import NoCapacity, ensure_placement, load_on_agent, scale_out
from agents.actions.heartbeats import apply_heartbeats
from agents.actions.history import prune_load_events
from agents.actions.loads import LoadJob, begin_load, fail_load, finish_load, record_first_token
from agents.actions.progress import record_progress
from agents.actions.registration import (
    CredentialError,
    Registration,
    RegistrationRefused,
    allow_enrolment,
    confirm_credential,
    drain_agent,
    register_agent,
    replica_failed,
    revoke_agent_credential,
    rotate_agent_credential,
    tell_revoked_agents,
    undrain_agent,
)
from agents.actions.steps import LOADING_STATES, UNLOAD_TIMEOUT_SECONDS
from agents.actions.sweeps import settle_orphaned_steps, step_down_excess, sweep
from agents.actions.unloads import (
    CannotStepDown,
    UnloadJob,
    begin_unload,
    fail_unload,
    finish_unload,
    unload,
)

__all__ = [
    "LOADING_STATES",
    "UNLOAD_TIMEOUT_SECONDS",
    "AdapterUnloadJob",
    "CannotStepDown",
    "CredentialError",
    "LoadJob",
    "ModelInUse",
    "NoCapacity",
    "Registration",
    "RegistrationRefused",
    "UnloadJob",
    "adapter_unload_job",
    "allow_enrolment",
    "apply_heartbeats",
    "begin_load",
    "begin_unload",
    "confirm_credential",
    "delete_model",
    "drain_agent",
    "ensure_placement",
    "fail_load",
    "fail_unload",
    "finish_load",
    "finish_unload",
    "forget_adapter",
    "load_on_agent",
    "orphan_unload_target",
    "prune_load_events",
    "record_first_token",
    "record_progress",
    "register_agent",
    "register_catalog_model",
    "replica_failed",
    "revoke_agent_credential",
    "rotate_agent_credential",
    "scale_out",
    "settle_orphaned_steps",
    "step_down_excess",
    "sweep",
    "tell_revoked_agents",
    "undrain_agent",
    "unload",
]
