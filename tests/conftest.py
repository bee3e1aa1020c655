from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.test import Client

from tests.azurite import Azurite
from tests.clouds import GcsEmulator, Moto
from tests.factories import make_staff_user


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    """One in-memory Azurite for the whole session, started and stopped by the tests."""
    server = Azurite(tmp_path_factory.mktemp("azurite")).start()
    yield server
    server.kill()


@pytest.fixture
def staff_client(db: None) -> Client:
    client = Client()
    client.force_login(make_staff_user())
    return client


@pytest.fixture
def agent_headers(settings: Any) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {settings.AGENT_TOKEN}"}


@pytest.fixture(autouse=True)
def gateway_reads_the_database_every_time(settings: Any) -> None:
    """Tests see their writes at once; tests/gateway/test_cache.py checks the cache itself."""
    from controlplane.gateway.state import forget_cached

    settings.GATEWAY_CACHE_SECONDS = 0
    forget_cached()


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    """One moto S3 server for the whole session, checking SigV4 against its own IAM user."""
    server = Moto(tmp_path_factory.mktemp("moto")).start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsEmulator]:
    """One in-memory GCS emulator for the whole session."""
    server = GcsEmulator(tmp_path_factory.mktemp("gcs")).start()
    yield server
    server.kill()
