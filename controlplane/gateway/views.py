"""The OpenAI-compatible endpoints."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.db.models import Exists, OuterRef, QuerySet
from django.db.models.functions import Coalesce
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.views.decorators.csrf import csrf_exempt

from agents.choices import ModelKind
from agents.models import Model, Placement
from agents.scheduling import ADMISSION_CLASSES
from controlplane import traces
from controlplane.gateway import stats, upstream
from controlplane.gateway.admission import Asker
from controlplane.gateway.apis import Api, usage_tokens
from controlplane.gateway.auth import AuthFailure, authenticate
from controlplane.gateway.coldstart import FOR_REQUEST, Asked
from controlplane.gateway.errors import openai_error, openai_errors
from controlplane.gateway.handler import request_id_of
from controlplane.gateway.job import Job
from controlplane.gateway.kvfollow import PromptBlocks
from controlplane.gateway.limits import Refusal, Reservation
from controlplane.gateway.models import ApiKey
from controlplane.gateway.prefix import Prefix, prefix_of
from controlplane.gateway.state import GatewayState, current
from controlplane.gateway.validation import (
    ApiRequest,
    InvalidRequest,
    estimate_prompt_tokens,
    parse_request,
)
from nodeagent.protocol import AdapterRef
from nodeagent.tracing import trace_headers


def _model_entry(model: Model, warm: bool) -> dict[str, Any]:
    """A catalog model in OpenAI's model shape, with whether it is warm right now."""
    return {
        "id": model.model_id,
        "object": "model",
        "created": int(model.created_at.timestamp()),
        "owned_by": model.owned_by,
        "kind": model.kind,
        "warm": warm,
        # A LoRA adapter names its base, as vLLM lists adapters; warm: a base replica serves.
        "parent": model.base.model_id if model.base is not None else None,
    }


def _with_warmth(models: QuerySet[Model]) -> QuerySet[Model]:
    """Each model with `warm`: a READY replica serves it (an adapter's: one of its base)."""
    ready = Placement.objects.ready_for_any().filter(
        model=Coalesce(OuterRef("base_id"), OuterRef("pk"))
    )
    return models.select_related("base").annotate(warm=Exists(ready))


@csrf_exempt
@openai_errors
async def list_models(request: HttpRequest) -> JsonResponse:
    """`GET /v1/models` in OpenAI's list shape."""
    if request.method != "GET":
        return openai_error(405, f"Method {request.method} is not allowed here; use GET.")
    key = await authenticate(request, current().cache)
    if isinstance(key, AuthFailure):
        return key.response
    models = _with_warmth(key.usable_models()).order_by("model_id")
    data = [_model_entry(model, model.warm) async for model in models]  # type: ignore[attr-defined]
    return JsonResponse({"object": "list", "data": data})


@csrf_exempt
@openai_errors
async def retrieve_model(request: HttpRequest, model_id: str) -> JsonResponse:
    """`GET /v1/models/{model}`: one model, as listed. A model this key may not use is as
    unknown to it as one that does not exist (404 both), as OpenAI answers."""
    if request.method != "GET":
        return openai_error(405, f"Method {request.method} is not allowed here; use GET.")
    key = await authenticate(request, current().cache)
    if isinstance(key, AuthFailure):
        return key.response
    model = await _with_warmth(key.usable_models()).filter(model_id=model_id).afirst()
    if model is None:
        return openai_error(
            404, f"The model `{model_id}` does not exist.", code="model_not_found", param="model"
        )
    return JsonResponse(_model_entry(model, model.warm))  # type: ignore[attr-defined]


ApiView = Callable[[HttpRequest], Coroutine[Any, Any, HttpResponseBase]]


def _api_view(api: Api, doc: str) -> ApiView:
    """The view of one POST endpoint: every one is served the same way (`serve`)."""

    async def view(request: HttpRequest) -> HttpResponseBase:
        return await serve(
            api,
            request.method or "",
            lambda state: authenticate(request, state.cache),
            lambda: _body_of(request),
            request_id_of(request),
            request.headers.get,
        )

    view.__name__ = view.__qualname__ = api.name.lower()
    view.__doc__ = doc
    return csrf_exempt(openai_errors(view))


chat_completions = _api_view(Api.CHAT, "`POST /v1/chat/completions`, streaming or not.")
completions = _api_view(Api.COMPLETIONS, "`POST /v1/completions`, streaming or not.")
responses = _api_view(Api.RESPONSES, "`POST /v1/responses`, streaming (typed events) or not.")
embeddings = _api_view(Api.EMBEDDINGS, "`POST /v1/embeddings`, for embedding models.")


@csrf_exempt
@openai_errors
async def stored_response(request: HttpRequest, response_id: str) -> JsonResponse:
    """`GET` and `DELETE /v1/responses/{id}` (and `POST .../cancel`): llmfleet keeps no
    response past its answer (validation._NOT_KEPT), so none is ever found: a 404 that says
    why, once the key is known to be good."""
    if request.method not in ("GET", "DELETE", "POST"):
        return openai_error(405, f"Method {request.method} is not allowed here.")
    key = await authenticate(request, current().cache)
    if isinstance(key, AuthFailure):
        return key.response
    return openai_error(
        404,
        f"No response with id `{response_id}` is stored: llmfleet does not store responses "
        "(any replica may answer a request, and an engine's memory goes when it is stepped "
        "down). Keep what you need from the answer itself.",
        code="response_not_found",
    )


BodyReader = Callable[[], bytes]  # the request's body; RequestDataTooBig past the limit
KeyFinder = Callable[[GatewayState], Awaitable[ApiKey | AuthFailure]]
HeaderReader = Callable[[str], str | None]  # a request header's value by name, None if absent


def _body_of(request: HttpRequest) -> bytes:
    declared = int(request.META.get("CONTENT_LENGTH") or 0)
    if declared > settings.GATEWAY_MAX_BODY_BYTES:
        raise RequestDataTooBig
    return request.body


def _read_request(read_body: BodyReader, api: Api) -> ApiRequest | JsonResponse:
    limit = settings.GATEWAY_MAX_BODY_BYTES
    try:
        raw = read_body()
    except RequestDataTooBig:
        return openai_error(
            413, f"The request body exceeds {limit} bytes.", code="request_too_large"
        )
    try:
        return parse_request(
            raw, api, max_tokens=settings.GATEWAY_MAX_TOKENS,
            default_max_tokens=settings.GATEWAY_DEFAULT_MAX_TOKENS,
        )  # fmt: skip
    except InvalidRequest as exc:
        return openai_error(exc.status, str(exc), code=exc.code, param=exc.param)


_KIND_SERVED_AT = {
    ModelKind.GENERATE: (
        "a text generation model",
        "/v1/chat/completions, /v1/completions and /v1/responses",
    ),
    ModelKind.EMBEDDING: ("an embedding model", "/v1/embeddings"),
}


async def _model_for(
    state: GatewayState, key: ApiKey, model_id: str, api: Api
) -> Model | JsonResponse:
    model = await state.cache.enabled_model(model_id)
    if model is None:
        return openai_error(
            404, f"The model `{model_id}` does not exist.", code="model_not_found", param="model"
        )
    if not key.may_use(model):
        return openai_error(
            403,
            f"This API key may not use the model `{model_id}`.",
            code="model_not_allowed",
            param="model",
        )
    if model.kind != api.kind:  # its engines would refuse it, after a cold start for nothing
        what, served_at = _KIND_SERVED_AT[ModelKind(model.kind)]
        return openai_error(
            400,
            f"The model `{model_id}` is {what} (kind `{model.kind}`): it is served at "
            f"{served_at}, not /v1/{api.value}.",
            code="wrong_model_kind",
            param="model",
        )
    return model


def _adapter_of(model: Model) -> AdapterRef | None:
    """What the agent needs to load a LoRA adapter into its base's engine."""
    if model.base is None:
        return None
    return AdapterRef(model.model_id, model.source, model.revision)


def _prefix_of(api: Api, body: dict[str, Any], model: Model) -> Prefix | None:
    """The prompt's prefix for cache-aware routing, keyed by the model whose replicas serve it
    and, for an adapter, by the adapter too (its KV is its own)."""
    if settings.GATEWAY_ROUTING_POLICY not in ("cache_aware", "precise"):
        return None
    key = str(model.pk) if model.base_id is None else f"{model.base_id}:{model.model_id}"
    return prefix_of(api, body, key, settings.GATEWAY_PREFIX_HASH_KIB * 1024)


def _prompt_of(api: Api, body: dict[str, Any], model: Model) -> PromptBlocks | None:
    """The prompt as the engines' KV blocks, for precise routing."""
    if settings.GATEWAY_ROUTING_POLICY != "precise":
        return None
    target = model.base.model_id if model.base is not None else model.model_id
    return PromptBlocks(api, body, model.model_id, target, settings.GATEWAY_PREFIX_HASH_KIB * 1024)


def _usage_recorder(
    state: GatewayState, key: ApiKey, model: Model, reserved: Reservation | None,
    record: stats.RequestRecord,
) -> upstream.UsageSink:  # fmt: skip
    def on_usage(usage: dict[str, Any]) -> None:
        prompt, completion = usage_tokens(usage)
        record.note(prompt_tokens=prompt, completion_tokens=completion)
        state.usage.add(key.pk, model.model_id, prompt, completion)
        if reserved is not None:  # settled after the answer, off its path
            state.in_background(reserved.settle(prompt + completion))

    return on_usage


def _admission_of(
    key: ApiKey, parsed: ApiRequest, header: HeaderReader, batch_line: bool = False
) -> tuple[str, float] | JsonResponse:
    """The request's admission class (X-Priority-Class, or the body's `priority_class`) and
    how long it may wait for a seat (GATEWAY_QUEUE_TIMEOUT_SECONDS, or less: X-Queue-Timeout).
    A batch's line is always `batch`, whatever classes its key may ask for."""
    if batch_line:
        return "batch", float(settings.GATEWAY_QUEUE_TIMEOUT_SECONDS)
    asked = header("X-Priority-Class") or parsed.priority_class
    if asked is not None and asked not in ADMISSION_CLASSES:
        return openai_error(
            400, f"Unknown priority class `{asked}`: use {' or '.join(ADMISSION_CLASSES)}.",
            code="invalid_priority_class", param="priority_class",
        )  # fmt: skip
    admitted = key.admission_class(asked)
    if admitted is None:
        return openai_error(
            400, f"This API key may not send requests in the `{asked}` class (it may use: "
            f"{key.priority_classes.replace(',', ', ')}).",
            code="priority_class_not_allowed", param="priority_class",
        )  # fmt: skip
    timeout = float(settings.GATEWAY_QUEUE_TIMEOUT_SECONDS)
    told = header("X-Queue-Timeout")
    if told is not None:
        try:
            seconds = float(told)
        except ValueError:
            seconds = math.nan
        if not 0 < seconds < math.inf:
            return openai_error(
                400, "X-Queue-Timeout must be a positive number of seconds.",
                code="invalid_queue_timeout",
            )  # fmt: skip
        timeout = min(timeout, seconds)
    return admitted, timeout


async def serve(
    api: Api,
    method: str,
    find_key: KeyFinder,
    read_body: BodyReader,
    request_id: str,
    header: HeaderReader,
    *,
    batch_line: Asked | None = None,
) -> HttpResponse | StreamingHttpResponse:
    """One request to a POST endpoint, from what Django's request object and the handler's
    scope both give: its method, its key (found from its headers), its body, its id and its
    other headers. A batch's line comes the same way (`batch_line`: controlplane.gateway.
    batchrun), admitted in the batch class, its model loaded as `batch_line` says."""
    state = current()  # the running loop's: everything this request uses between requests
    record = stats.RequestRecord(state.stats)
    if (tracer := traces.tracer()) is not None:
        # The client's traceparent, where it sent one: the trace starts in the application.
        record.trace, record.trace_start_ns = tracer.begin(trace_headers(header)), time.time_ns()
        record.name = f"POST /v1/{api.value}"
        record.note(api=api.value, request_id=request_id, batch_line=batch_line is not None)
        # What it asks for in the database's thread (a load) carries its context on.
        traces.ASKING.set(record.trace_headers())
    try:
        response = await _answer(
            state, api, method, find_key, read_body, record, request_id, header, batch_line
        )
    except asyncio.CancelledError:  # the client left before its answer: counted, as a stream's
        record.finish(499)
        raise
    response["X-Request-Id"] = request_id
    if not isinstance(response, StreamingHttpResponse):  # a stream counts itself as it ends
        record.finish(response.status_code)
    return response


async def _answer(
    state: GatewayState,
    api: Api,
    method: str,
    find_key: KeyFinder,
    read_body: BodyReader,
    record: stats.RequestRecord,
    request_id: str,
    header: HeaderReader,
    batch_line: Asked | None = None,
) -> HttpResponse | StreamingHttpResponse:
    """Authenticate, parse, resolve the model, admit, serve."""
    if method != "POST":
        return openai_error(405, f"Method {method} is not allowed here; use POST.")
    key = await find_key(state)
    if isinstance(key, AuthFailure):
        return key.response
    parsed = _read_request(read_body, api)
    if isinstance(parsed, JsonResponse):
        return parsed
    model = await _model_for(state, key, parsed.model_id, api)
    if isinstance(model, JsonResponse):
        return model
    admission = _admission_of(key, parsed, header, batch_line is not None)
    if isinstance(admission, JsonResponse):
        return admission
    record.model, record.model_pk = model.model_id, model.pk
    prompt_tokens = estimate_prompt_tokens(parsed.body)
    admitted = await state.limiter.admit(key, prompt_tokens + parsed.max_tokens)
    if isinstance(admitted, Refusal):
        refused = openai_error(429, admitted.message, code="rate_limit_exceeded")
        refused["Retry-After"] = str(admitted.retry_after)
        return refused
    raw, strip_usage = (
        upstream.ask_for_usage(parsed.raw, parsed.body)
        if parsed.stream and api.asks_for_usage
        else (parsed.raw, False)
    )
    meter = upstream.Meter(_usage_recorder(state, key, model, admitted, record), prompt_tokens)
    record.note(key=key.name, stream=parsed.stream, priority_class=admission[0])
    asker = Asker(key.pk, key.name, key.weight, admission[0], prompt_tokens)
    job = Job(
        model, api, raw, parsed.user, parsed.stream, strip_usage, meter, record,
        parsed.keep_alive, adapter=_adapter_of(model), request_id=request_id,
        prefix=_prefix_of(api, parsed.body, model),
        prompt=_prompt_of(api, parsed.body, model), asker=asker, queue_timeout=admission[1],
        asked=batch_line or FOR_REQUEST, sequences=_sequences_of(parsed.body),
    )  # fmt: skip
    try:
        response = await state.router.serve(job)
    except BaseException:  # the client left while held, the database is away
        if admitted is not None and not meter.settled:
            state.in_background(admitted.settle(0))
        raise
    if admitted is not None:  # a request that reached no engine gives its reservation back
        _unreserve_unless_used(state, meter, admitted, response)
    return response


def _sequences_of(body: dict[str, Any]) -> int:
    """How many sequences the request asks an engine for: its `n` (validated), else one."""
    n = body.get("n")
    return n if isinstance(n, int) and n > 1 else 1


def _unreserve_unless_used(
    state: GatewayState,
    meter: upstream.Meter,
    reserved: Reservation,
    response: HttpResponse | StreamingHttpResponse,
) -> None:
    def unless_used() -> None:
        if not meter.settled:
            state.in_background(reserved.settle(0))

    if isinstance(response, StreamingHttpResponse):
        upstream.on_close(response, unless_used)  # after the stream's own cleanup settled it
    else:
        unless_used()
