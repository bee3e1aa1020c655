from __future__ import annotations

import pytest

from nodeagent.protocol import (
    DiskInfo,
    GpuInfo,
    HeartbeatResponse,
    LoadModelRequest,
    ModelStatus,
    ProtocolError,
    UnloadModelRequest,
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


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "must be a JSON object"),
        ({"source": "file:///m"}, "'model_id' is required"),
        ({"model_id": "", "source": "file:///m"}, "'model_id' must be a non-empty string"),
        ({"model_id": "m"}, "'source' is required"),
        ({"model_id": "m", "source": "s3://b/k"}, "file:// or azure://"),
        (
            {"model_id": "m", "source": "file:///m", "engine": {"name": "tgi"}},
            "'engine.name' must be one of",
        ),
        (
            {"model_id": "m", "source": "file:///m", "engine": {"args": "--x"}},
            "'engine.args' must be a list",
        ),
        ({"model_id": "m", "source": "file:///m", "revision": 3}, "'revision' must be a string"),
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
