"""Models in S3 and GCS, and a model in two stores whose nearest is down, served for real:
daphne, a Celery worker and beat, PostgreSQL, Redis, a node agent process (sim engine),
moto and gcp-storage-emulator processes, the openai client."""

from __future__ import annotations

import io
from contextlib import ExitStack

import pytest

from agents import actions
from agents.models import LoadEvent
from nodeagent import tinymodel
from nodeagent.engines.simanswers import words_for
from nodeagent.protocol import SourceSpec
from nodeagent.store.publish import publish
from tests.clouds import Moto
from tests.e2e.fleet import registered, running_control_plane
from tests.e2e.test_lifecycle import SIM, ask, client_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def fleet(settings, tmp_path):
    with ExitStack() as stack:
        plane = stack.enter_context(running_control_plane(settings, tmp_path))
        yield plane, stack


def test_a_model_whose_nearest_store_is_down_is_served_from_its_mirror(fleet, tmp_path, gcs):
    plane, stack = fleet
    checkpoint = tinymodel.build(tmp_path / "checkpoint")
    # The S3 copy was published, then its store went away (moto killed).
    s3 = Moto(tmp_path / "moto").start()
    publish(checkpoint, "s3://models/org/tiny", s3.environ(), stream=io.StringIO())
    s3.kill()
    publish(checkpoint, "gs://models/e2e/tiny", gcs.environ(), stream=io.StringIO())
    environ = {**s3.environ(), **gcs.environ()}
    agent = plane.agent(
        stack, tmp_path, "gpu-aws", *SIM, "--labels", "cloud=aws,region=us-east-1",
        "--source-failover", "2", extra_env=environ,
    )  # fmt: skip
    registered("gpu-aws")
    actions.register_catalog_model(
        "org/tiny", "gs://models/e2e/tiny", size_bytes=1, source_labels={"cloud": "gcp"},
        mirrors=[SourceSpec("s3://models/org/tiny", {"cloud": "aws"})],
    )  # fmt: skip

    client = client_for(plane.url)
    assert ask(client) == " ".join(words_for("hello there", 5))

    [load] = LoadEvent.objects.filter(model__model_id="org/tiny")
    assert load.source == "gs://models/e2e/tiny"
    # The agent said which source it gave up on (its cold start's trace shows it too).
    assert load.failed_sources.startswith("s3://models/org/tiny: ")
    assert load.bytes_downloaded == sum(p.stat().st_size for p in checkpoint.iterdir())
    # The agent went to its own cloud's copy first, and said why it left it.
    assert "source s3://models/org/tiny failed" in agent.log()
    assert "trying the next" in agent.log()
    assert s3.keys["AWS_SECRET_ACCESS_KEY"] not in agent.log()
