"""A node agent behind a link the test cuts (tests/e2e/netns.py): what a client sees when its
stream's agent drops off the network, and what it is charged. The fault suite
(tests/e2e/faults.py: network_partition, network_delay_loss, network_cut_mid_stream) covers
the fleet's convergence and steady traffic; this is one client's view."""

from __future__ import annotations

from contextlib import ExitStack

import openai
import pytest

from controlplane.gateway.models import Usage
from tests.e2e import netns
from tests.e2e.fault_world import SIM, World, catalog
from tests.e2e.fleet import running_control_plane, serving_on
from tests.e2e.injectors import NET_AGENT, _networked_agent
from tests.factories import make_api_key
from tests.support import wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(bool(netns.available()), reason=netns.available() or "-"),
]


def test_a_link_cut_mid_stream_ends_it_with_an_error_event_charged_for_what_was_relayed(
    settings, tmp_path
):
    with ExitStack() as stack:
        link = stack.enter_context(netns.linked_namespace())
        plane = stack.enter_context(
            running_control_plane(
                settings, tmp_path, ALLOWED_HOSTS=f"localhost,127.0.0.1,{link.host_ip}",
                GATEWAY_STREAM_IDLE_SECONDS="3", GATEWAY_USAGE_FLUSH_SECONDS="1",
            )
        )  # fmt: skip
        world = World(settings, tmp_path, stack, plane, plane.url, extra={"link": link})
        _networked_agent(world, NET_AGENT, *SIM[:-1], "100")  # 100 ms a token
        serving_on(catalog(world, max_replicas=1), NET_AGENT, seconds=60)
        _, raw_key = make_api_key("cut")
        client = openai.OpenAI(base_url=f"{plane.url}/v1", api_key=raw_key, max_retries=0)
        stream = client.chat.completions.create(
            model="org/tiny", messages=[{"role": "user", "content": "a long answer, please"}],
            max_tokens=200, stream=True, extra_body={"ignore_eos": True},
        )  # fmt: skip
        received = []

        def read_and_cut_the_link_at_the_fifth_token() -> None:
            for chunk in stream:
                received.append(chunk)
                if sum(1 for c in received if c.choices and c.choices[0].delta.content) == 5:
                    link.cut()  # and it stays cut: the agent is gone from the network

        with pytest.raises(openai.APIError, match="failed mid-stream"):
            read_and_cut_the_link_at_the_fifth_token()
        assert 6 <= len(received) < 200  # the role's chunk, five tokens, what was in flight
        wait_for(lambda: Usage.objects.filter(model_id="org/tiny").exists(), 20, "the usage")
        usage = Usage.objects.get(model_id="org/tiny")
        # Charged for what was relayed, an event a token (the engine never said: the prompt's
        # is an estimate).
        assert (usage.requests, usage.completion_tokens) == (1, len(received))
        assert usage.prompt_tokens > 0
