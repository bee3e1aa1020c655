"""One request as the router serves it, and what its client is told when it is not served.

`Job` is a validated request; `Claim` its share of a replica's in-flight count; `Opened` the
replica that answered it; `Cleanup` what a streamed answer undoes however it ends. The
replies below (`shed`, `engine_busy`, `not_ready` and the messages they carry) tell a client
what went wrong without the fleet's insides: the operators' log has those, under the
request id.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.http import JsonResponse

from agents.models import Model, Placement
from controlplane import metrics
from controlplane.gateway import coldstart, stats, upstream
from controlplane.gateway.admission import Asker, Shed, Ticket
from controlplane.gateway.agenthttp import AgentAnswer
from controlplane.gateway.apis import Api, usage_tokens
from controlplane.gateway.errors import openai_error
from controlplane.gateway.kvfollow import PromptBlocks
from controlplane.gateway.prefix import Prefix
from controlplane.gateway.upstream import Meter
from nodeagent.protocol import AdapterRef

log = logging.getLogger(__name__)

Generation = tuple[int, object]


def generation(placement: Placement) -> Generation:
    """A replica as one request tries it: the same row written again (a heartbeat that says
    it serves, a new load) is a new try."""
    return placement.pk, placement.updated_at


@dataclass
class Job:
    """One request (a completion, a response, embeddings), validated, for a model the key may
    use."""

    model: Model
    api: Api  # which endpoint: the path upstream, and how its stream reads
    raw: bytes  # the body to send upstream
    user: str | None
    stream: bool
    strip_usage: bool  # the gateway asked for the stream's usage event; it is not the client's
    meter: Meter
    record: stats.RequestRecord
    keep_alive: float | None = None  # seconds the request asked its replica to stay warm
    # For a LoRA adapter (`model` is one): what the agent loads into its base's engine.
    adapter: AdapterRef | None = None
    # The prompt's prefix, for cache-aware routing (None under another policy).
    prefix: Prefix | None = None
    # The prompt as the engines' blocks, for precise routing (None under another policy).
    prompt: PromptBlocks | None = None
    # What the client and the operators' log both name the request by (X-Request-Id).
    request_id: str = ""
    # Who asks for a seat on the model's replicas, and how long it may wait for one
    # (controlplane.gateway.admission); None: admitted without a seat (tests of routing alone).
    asker: Asker | None = None
    queue_timeout: float = 60.0
    ticket: Ticket | None = None  # its seat while it holds one
    # Gives back its place among a cold start's waiters (Admission.enter_cold), once.
    cold_place: Callable[[], None] | None = None
    # Why a load it waits on would be started, and what that load may step down.
    asked: coldstart.Asked = coldstart.FOR_REQUEST
    sequences: int = 1  # its `n`: each takes one of an engine's seats

    def release_seat(self) -> None:
        if self.ticket is not None:
            self.ticket.release()

    def take_seat(self, ticket: Ticket) -> None:
        """The request holds `ticket`; what it is served goes on its key's counter (the
        seat it holds when its usage is known: a cold request holds a second one)."""
        first = self.ticket is None
        self.ticket = ticket
        if not first:
            return
        sink = self.meter.on_usage

        def on_usage(usage: dict[str, Any]) -> None:
            sink(usage)
            if self.ticket is not None:
                self.ticket.served(usage_tokens(usage)[1])

        self.meter.on_usage = on_usage

    def leave_cold(self) -> None:
        leave, self.cold_place = self.cold_place, None
        if leave is not None:
            leave()

    @property
    def target(self) -> Model:
        """The model whose replicas serve the request: an adapter's base, else the model."""
        return self.model.base if self.model.base is not None else self.model


class Claim:
    """One request's share of a placement's in-flight count, given back exactly once."""

    def __init__(self, counts: Counter[int], placement: Placement, model: Model) -> None:
        self.counts = counts
        self.placement_id = placement.pk
        self.gauge = metrics.GATEWAY_IN_FLIGHT.labels(model.model_id, placement.agent.agent_id)
        self.released = False
        counts[self.placement_id] += 1
        self.gauge.inc()

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.gauge.dec()
        self.counts[self.placement_id] -= 1
        if self.counts[self.placement_id] <= 0:
            del self.counts[self.placement_id]


@dataclass
class Opened:
    """A replica that answered: its response with headers read, and the request's claim."""

    placement: Placement
    answer: AgentAnswer
    claim: Claim
    meter: Meter

    def abandon(self) -> None:
        """The client is gone (or the answer is done): free the connection and the claim, and
        charge what was spent (nothing more when the usage was said already)."""
        self.answer.close()
        self.claim.release()
        self.meter.settle()


class Refused(Exception):
    """Admission refused a cold request its seat (its bounds, its deadline)."""

    def __init__(self, shed: Shed) -> None:
        super().__init__(shed.message)
        self.shed = shed


class Cleanup:
    """What a streamed response must undo however it ends, even if its generator never runs
    to its `finally` (a client that leaves while the generator waits at a `yield`): Django
    calls the response's closers when the handler is done with it."""

    def __init__(self) -> None:
        self.steps: list[Callable[[], object]] = []

    def add(self, step: Callable[[], object]) -> None:
        self.steps.append(step)

    def __call__(self) -> None:
        steps, self.steps = self.steps, []
        for step in steps:
            step()


def told(job: Job, failed: coldstart.ColdStartFailed) -> str:
    """What the client hears of a cold start that failed: its short message and the request
    id; the operators' log has the detail (agents, errors, log tails) under that id."""
    log.warning("request %s: no replica of %s: %s", job.request_id, job.target.model_id,
                failed.detail)  # fmt: skip
    return f"{failed} Retry later; request id {job.request_id}."


# What a client is told of an agent's own refusal of its request (the agent's message may name
# stores, paths and hosts: the operators' log has it, under the request id).
_REFUSALS = {
    "body_too_large": "The request body is over the model server's limit.",
    "bad_request": "The model's server could not read the request.",
}


def refusal_told(job: Job, refused: upstream.AgentRefusal) -> str:
    log.warning("request %s: %s refused: %s: %s", job.request_id, job.model.model_id,
                refused.code, refused.message)  # fmt: skip
    if refused.code.startswith("adapter_"):
        told = f"The LoRA adapter `{job.model.model_id}` could not be loaded ({refused.code})."
    else:
        told = _REFUSALS.get(
            refused.code, f"The model's server refused the request ({refused.code})."
        )
    return f"{told} Request id {job.request_id}."


def without_lora(job: Job) -> str:
    return (
        f"Every replica of `{job.target.model_id}` runs without LoRA, so none can serve its "
        f"adapter `{job.model.model_id}`: its engines start with LoRA when they next load (an "
        "operator may unload one now)."
    )


def error_message(status: int, body: bytes) -> str:
    try:
        error = json.loads(body).get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    return f"The model's server answered {status}: {message or body[:200].decode(errors='replace')}"


def shed(refused: Shed) -> JsonResponse:
    """Admission's refusal in OpenAI's shape: 429 queue_full, 503 queue_timeout."""
    response = openai_error(refused.status, refused.message, code=refused.code)
    response["Retry-After"] = str(refused.retry_after)
    return response


def engine_busy(job: Job) -> JsonResponse:
    """A batch-class request that found no room on its replicas' engines: their seats serve
    other requests now (nodeagent.batchgate). It did not run; the batch sends it later."""
    refused = openai_error(
        503, f"Every replica of `{job.target.model_id}` is busy with other requests: "
        "batch-class requests wait for free seats; try again later.", code="engine_busy",
    )  # fmt: skip
    refused["Retry-After"] = "5"
    return refused


def not_ready(message: str, code: str = "model_not_ready") -> JsonResponse:
    response = openai_error(503, message, code=code)
    response["Retry-After"] = str(settings.GATEWAY_RETRY_AFTER_SECONDS)
    return response
