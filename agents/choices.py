"""State enums of the fleet. Compare against these members, never bare strings."""

from django.db import models

from nodeagent.protocol import AGENT_REPORTED_STATES


class AgentState(models.TextChoices):
    """What routing and scheduling see of an agent.

    IDLE, LOADING_MODEL, INFERRING and DEGRADED (it cannot load, e.g. its cache
    is not writable) are what the agent reports; DEGRADED and OFFLINE are also
    the control plane's verdict on missed heartbeats; DRAINING is an operator's
    order, which outlasts a report (see `scheduling.effective_agent_state`).
    """

    IDLE = "IDLE", "Idle"
    LOADING_MODEL = "LOADING_MODEL", "Loading a model"
    INFERRING = "INFERRING", "Inferring"
    DEGRADED = "DEGRADED", "Degraded"
    OFFLINE = "OFFLINE", "Offline"
    DRAINING = "DRAINING", "Draining"


# States an agent itself may report in a heartbeat or at registration: the contract's list.
REPORTED_AGENT_STATES = tuple(AgentState(state) for state in AGENT_REPORTED_STATES)
# Agents in these states get no new work: no new requests, no new placements.
UNROUTABLE_AGENT_STATES = (AgentState.DRAINING, AgentState.DEGRADED, AgentState.OFFLINE)


class PlacementState(models.TextChoices):
    DOWNLOADING = "DOWNLOADING", "Downloading"
    LOADING_TO_GPU = "LOADING_TO_GPU", "Loading to GPU"
    READY = "READY", "Ready"
    UNLOADING = "UNLOADING", "Unloading"
    UNLOADED = "UNLOADED", "Unloaded"
    FAILED = "FAILED", "Failed"


class CacheLevel(models.TextChoices):
    """Where a model's weights are on an agent, fastest to serve first (the eviction ladder)."""

    GPU_RESIDENT = "GPU_RESIDENT", "GPU resident"
    DRAM_CACHED = "DRAM_CACHED", "Host RAM (engine asleep)"
    NVME_CACHED = "NVME_CACHED", "Local disk"
    NONE = "NONE", "Not on this agent"


class ModelKind(models.TextChoices):
    """What a model's engines do, and so which endpoints serve it."""

    GENERATE = "generate", "Text generation (chat, completions, responses)"
    EMBEDDING = "embedding", "Embeddings"


class EngineStart(models.TextChoices):
    PLAIN = "plain", "Plain start"
    STANDBY = "standby", "Standby engine"


class CompileCache(models.TextChoices):
    NEW = "new", "New (compiled by this start)"
    LOCAL = "local", "The agent's own"
    STORE = "store", "From the store (another agent's)"
    DISCARDED = "discarded", "Discarded (the engine failed with it)"


class LoadEventKind(models.TextChoices):
    LOAD = "LOAD", "Load"
    UNLOAD = "UNLOAD", "Unload"


class LoadOutcome(models.TextChoices):
    PENDING = "PENDING", "In progress"
    SUCCEEDED = "SUCCEEDED", "Succeeded"
    FAILED = "FAILED", "Failed"


class LoadTrigger(models.TextChoices):
    """Why a load or unload happened: the dashboard and the scheduler tell them apart."""

    REQUEST = "REQUEST", "Cold request"
    BATCH = "BATCH", "Batch"
    SCALE_OUT = "SCALE_OUT", "Scale-out"
    OPERATOR = "OPERATOR", "Operator"
    KEEP_ALIVE = "KEEP_ALIVE", "Idle past keep-alive"
    PRESSURE = "PRESSURE", "Memory pressure"
    EXCESS = "EXCESS", "Beyond max_replicas"
    FAILURE = "FAILURE", "Failure recovery"
