"""What the gateway saw of a replica that could not take a request: the one vocabulary the
gateway (which finds the fault) and `agents.actions` (which marks the replica) both speak.

It lives here, below the gateway, so that `agents` never imports `controlplane.gateway`.
"""

from __future__ import annotations

from enum import StrEnum


class Fault(StrEnum):
    """Why a replica could not take a request before its first byte."""

    UNREACHABLE = "unreachable"  # the agent did not answer: connection refused, reset, timeout
    DRAINING = "draining"  # the agent is stopping and takes no new requests
    NOT_SERVING = "not_serving"  # the agent answers: the model is not there, or its engine is gone
    # The replica serves, but cannot take this adapter's request now (every adapter slot of its
    # engine busy, or an engine without LoRA): another replica may; this one is not marked.
    NO_ROOM = "no_room"
    NO_LORA = "no_lora"  # its engine runs without LoRA: it never takes an adapter's request
    # A batch-class request that found no room on the engine in time: the engine's seats
    # serve others (nodeagent.batchgate). Not marked; another replica may have room.
    BUSY = "busy"
