from __future__ import annotations

import json

import pytest

from nodeagent.protocol import (
    CONTRACT_VERSION,
    AgentReportedState,
    CacheLevel,
    DiskInfo,
    GpuInfo,
    HeartbeatResponse,
    LoadModelRequest,
    ModelState,
    ModelStatus,
    ProtocolError,
    SourceSpec,
    UnloadModelRequest,
    source_store,
)


def test_load_request_with_engine_arguments():
    request = LoadModelRequest.from_json(
        {
            "model_id": "org/m",
            "source": "azure://models/org/m",
            "revision": "abc",
            "engine": {"name": "vllm", "args": ["--dtype", "float32"]},
        }
    )
    assert (request.model_id, request.revision, request.engine.name) == ("org/m", "abc", "vllm")
    assert request.engine.args == ("--dtype", "float32")
    assert LoadModelRequest.from_json(request.to_json()) == request


def test_a_load_request_carries_every_source_with_its_labels():
    sources = (SourceSpec("s3://b/k", {"cloud": "aws"}), SourceSpec("gs://b/k"))
    request = LoadModelRequest("org/m", "s3://b/k", sources=sources)
    decoded = LoadModelRequest.from_json(request.to_json())
    assert decoded == request
    assert decoded.all_sources == sources
    # From a control plane that sends no list (contract 1.3): the one source.
    older = LoadModelRequest.from_json({"model_id": "org/m", "source": "azure://c/m"})
    assert older.all_sources == (SourceSpec("azure://c/m"),)


@pytest.mark.parametrize(
    ("uri", "store"),
    [
        ("s3://bucket/a/b", "s3://bucket"),
        ("gs://bucket/a", "gs://bucket"),
        ("azure://container/a/b/c", "azure://container"),
        ("file:///srv/models/a", "file://"),
    ],
)
def test_bandwidth_is_learned_per_store(uri, store):
    assert source_store(uri) == store


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "must be a JSON object"),
        ({"source": "file:///m"}, "'model_id' is required"),
        ({"model_id": "", "source": "file:///m"}, "'model_id' must be a non-empty string"),
        ({"model_id": "m"}, "'source' is required"),
        ({"model_id": "m", "source": "hdfs://b/k"}, "file://, azure://, s3:// or gs://"),
        (
            {"model_id": "m", "source": "file:///m", "engine": {"name": "tgi"}},
            "'engine.name' must be one of",
        ),
        (
            {"model_id": "m", "source": "file:///m", "engine": {"args": "--x"}},
            "'engine.args' must be a list",
        ),
        ({"model_id": "m", "source": "file:///m", "revision": 3}, "'revision' must be a string"),
        ({"model_id": "m", "source": "file:///m", "sources": "s3://b/k"}, "'sources' must be a"),
        ({"model_id": "m", "source": "file:///m", "sources": ["s3://b/k"]}, "'sources\\[0\\]'"),
        (
            {"model_id": "m", "source": "file:///m", "sources": [{"uri": "ftp://b/k"}]},
            "'sources\\[0\\].uri' must be a file://, azure://, s3:// or gs:// URI",
        ),
        (
            {
                "model_id": "m",
                "source": "file:///m",
                "sources": [{"uri": "s3://b/k", "labels": {"zone": 1}}],
            },
            "'sources\\[0\\].labels' must be an object of strings",
        ),
    ],
)
def test_bad_load_requests_say_what_is_wrong(body, message):
    with pytest.raises(ProtocolError, match=message):
        LoadModelRequest.from_json(body)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"model_id": "m", "to": "GPU_RESIDENT"},
            "'to' must be one of DRAM_CACHED, NVME_CACHED, NONE",
        ),
        ({"model_id": "m"}, "'to' is required"),
        ({"model_id": "m", "to": "NONE", "force": "yes"}, "'force' must be true or false"),
    ],
)
def test_bad_unload_requests_say_what_is_wrong(body, message):
    with pytest.raises(ProtocolError, match=message):
        UnloadModelRequest.from_json(body)


def test_heartbeat_round_trips_through_json():
    heartbeat = HeartbeatResponse(
        agent_id="a",
        state="IDLE",
        version="1",
        gpus=(GpuInfo(0, "H100", 80, 70, 5.0, "GPU-1"),),
        gpu_utilization=5.0,
        gpu_memory_total=80,
        gpu_memory_free=70,
        vllm_queue_length=0,
        disk=DiskInfo("/cache", 100, 50, 10),
        models=(ModelStatus("m", "READY", "GPU_RESIDENT", progress=1.0),),
    )
    assert HeartbeatResponse.from_json(heartbeat.to_json()) == heartbeat


def _heartbeat(**changes: object) -> dict:
    body = HeartbeatResponse(
        agent_id="a",
        state=AgentReportedState.IDLE,
        version="1",
        disk=DiskInfo("/cache", 100, 50, 10),
        models=(ModelStatus("m", ModelState.READY, CacheLevel.GPU_RESIDENT, bytes_done=5),),
        contract=CONTRACT_VERSION,
    ).to_json()
    body.update(changes)
    return body


def test_a_heartbeat_from_a_newer_minor_version_with_fields_it_added_is_understood():
    body = _heartbeat(contract="1.9", power_watts=350, topology={"nvlink": True})
    body["models"][0]["speculative_acceptance"] = 0.7
    body["disk"]["inodes_free"] = 10
    beat = HeartbeatResponse.from_json(json.dumps(body).encode())
    assert (beat.contract, beat.models[0].model_id, beat.models[0].bytes_done) == ("1.9", "m", 5)


def test_a_heartbeat_from_an_older_agent_lacking_the_newer_optional_fields_gets_defaults():
    body = _heartbeat()
    for key in ("contract", "gpus", "gpu_utilization", "vllm_queue_length"):
        del body[key]
    for key in ("last_used_at", "download_bytes_per_s", "requests_in_flight", "engine"):
        del body["models"][0][key]
    beat = HeartbeatResponse.from_json(body)
    assert (beat.contract, beat.gpus, beat.vllm_queue_length) == ("1.0", (), 0)
    assert (beat.models[0].last_used_at, beat.models[0].requests_in_flight) == (None, 0)


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (lambda b: b["models"][0].update(bytes_done=None), "$.models[0].bytes_done"),
        (lambda b: b["models"][0].update(last_used_at="yesterday"), "$.models[0].last_used_at"),
        (lambda b: b["models"][0].update(last_used_at="2026-12-01T10:00:00"), "last_used_at"),
        (lambda b: b["models"][0].update(cache_state="HALF_READY"), "$.models[0].cache_state"),
        (lambda b: b["models"][0].update(requests_waiting=-1), "$.models[0].requests_waiting"),
        (lambda b: b["models"][0].update(model_id="m" * 201), "$.models[0].model_id"),
        (lambda b: b.update(version="v" * 65), "$.version"),
        (lambda b: b.update(state=3), "$.state"),
        (lambda b: b.pop("disk"), "disk"),
        (lambda b: b.update(models={"m": {}}), "$.models"),
    ],
)
def test_a_heartbeat_with_a_wrong_type_or_value_is_refused_naming_the_field(change, where):
    body = _heartbeat()
    change(body)
    with pytest.raises(ProtocolError) as refused:
        HeartbeatResponse.from_json(json.dumps(body).encode())
    assert where in str(refused.value)


def test_a_heartbeat_of_another_major_version_is_refused():
    with pytest.raises(ProtocolError, match="not compatible"):
        HeartbeatResponse.from_json(_heartbeat(contract="2.0"))
    with pytest.raises(ProtocolError, match=r"major\.minor"):
        HeartbeatResponse.from_json(_heartbeat(contract="latest"))


def test_garbage_is_refused_as_malformed_json():
    with pytest.raises(ProtocolError, match="malformed JSON"):
        HeartbeatResponse.from_json(b"<html>502 Bad Gateway</html>")
