from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from tests.factories import make_staff_user


@pytest.fixture
def staff_client(db: None) -> Client:
    client = Client()
    client.force_login(make_staff_user())
    return client


@pytest.fixture
def agent_headers(settings: Any) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {settings.AGENT_TOKEN}"}
