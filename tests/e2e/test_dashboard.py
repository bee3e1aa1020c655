"""The dashboard and /metrics for real: daphne, worker, beat, a sim agent, headless Chromium.

The browser test logs in, opens the dashboard, triggers a cold start, and watches the load's
progress bar move and the placement turn READY without a reload. Its screenshots (the
dashboard, during the cold start and after, and the admin's agents page) are kept in
test-artifacts/, where the docs' pictures come from.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from agents import actions
from agents.choices import CacheLevel
from agents.models import Agent, Placement
from nodeagent import tinymodel
from tests.e2e.agent_process import ROOT
from tests.e2e.fleet import SCRAPER, running_control_plane
from tests.factories import make_api_key, make_staff_user
from tests.support import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
PASSWORD = "correct horse battery staple"  # make_staff_user's
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
def checkpoint(tmp_path):
    """The tiny checkpoint and 24 MB of padding, so a throttled download takes seconds."""
    directory = tinymodel.build(tmp_path / "checkpoint")
    (directory / "padding.bin").write_bytes(bytes(24 * 1024 * 1024))
    return directory.as_uri()


def test_the_dashboard_shows_a_cold_start_live(settings, tmp_path, checkpoint):
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    make_staff_user()
    with ExitStack() as stack:
        plane = stack.enter_context(running_control_plane(settings, tmp_path))
        plane.agent(stack, tmp_path, "gpu-a", "--engine", "sim", "--sim-load-seconds", "1",
                    "--download-limit-mb-s", "4")  # fmt: skip
        wait_for(lambda: Agent.objects.filter(agent_id="gpu-a").exists(), 30, "registration")
        actions.register_catalog_model("org/tiny", checkpoint, size_bytes=1)
        _, raw_key = make_api_key("browser")
        client = openai.OpenAI(base_url=f"{plane.url}/v1", api_key=raw_key, max_retries=0)

        browser = stack.enter_context(sync_playwright()).chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox"]
        )
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"{plane.url}/admin/login/?next=/dashboard/")
        page.fill("#id_username", "operator")
        page.fill("#id_password", PASSWORD)
        page.click("input[type=submit]")
        page.wait_for_url("**/dashboard/")
        page.wait_for_selector("#status.live")
        page.wait_for_selector("[data-agent='gpu-a']")
        page.evaluate("window.loadedOnce = true")  # gone if the page reloads

        answers: list[str] = []
        cold = threading.Thread(
            target=lambda: answers.append(
                client.chat.completions.create(model="org/tiny", messages=HELLO, max_tokens=3)
                .choices[0].message.content or ""
            )
        )  # fmt: skip
        cold.start()
        seen: list[float] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not page.query_selector("li[data-state='READY']"):
            bar = page.query_selector("[data-load] .bar")
            if bar is not None:
                seen.append(float(bar.get_attribute("data-progress") or 0))
                if len(set(seen)) == 3:
                    page.screenshot(path=str(tmp_path / "loading.png"), full_page=True)
            time.sleep(0.2)
        page.wait_for_selector("li[data-state='READY']", timeout=30_000)
        cold.join(timeout=60)
        assert answers
        assert answers[0]
        assert page.evaluate("window.loadedOnce") is True
        moving = sorted(set(seen))
        assert len(moving) >= 2, f"the progress bar did not move: {seen}"
        assert moving[0] < moving[-1]
        page.wait_for_selector("[data-coldstart]")  # the finished load's timeline
        page.wait_for_selector("tr[data-model='org/tiny']", timeout=15_000)  # request figures
        # A batch's progress, live: its row appears, and says when it has completed.
        lines = "".join(
            json.dumps({"custom_id": f"r{n}", "method": "POST", "url": "/v1/chat/completions",
                        "body": {"model": "org/tiny", "messages": HELLO, "max_tokens": 2}}) + "\n"
            for n in range(3)
        ).encode()  # fmt: skip
        uploaded = client.files.create(file=("in.jsonl", lines), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, completion_window="24h",
                                      endpoint="/v1/chat/completions")  # fmt: skip
        row = f"tr[data-batch='{batch.id}']"
        page.wait_for_selector(row, timeout=15_000)
        page.wait_for_function(
            f'document.querySelector("{row}").textContent.includes("completed")', timeout=60_000
        )
        assert "3 of 3" in (page.text_content(row) or "")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        if (tmp_path / "loading.png").exists():
            shutil.copy(tmp_path / "loading.png", ARTIFACTS / "dashboard-loading.png")
        # The admin's fleet page, with the agent and what it serves (docs/operating.md).
        page.goto(f"{plane.url}/admin/agents/agent/")
        page.wait_for_selector("#result_list")
        assert "gpu-a" in (page.text_content("#result_list") or "")
        page.screenshot(path=str(ARTIFACTS / "admin-agents.png"), full_page=True)


def scrape(url: str) -> dict[str, set[tuple[str, ...]]]:
    """Metric name -> the label-name tuples of its samples."""
    found: dict[str, set[tuple[str, ...]]] = {}
    for family in text_string_to_metric_families(
        requests.get(f"{url}/metrics", timeout=10, headers=SCRAPER).text
    ):
        for sample in family.samples:
            found.setdefault(sample.name, set()).add(tuple(sorted(sample.labels)))
    return found


def test_metrics_after_a_warm_request_a_cold_start_and_an_eviction(settings, tmp_path):
    from datetime import timedelta

    checkpoint = tinymodel.build(tmp_path / "checkpoint").as_uri()
    with ExitStack() as stack:
        plane = stack.enter_context(running_control_plane(settings, tmp_path))
        plane.agent(stack, tmp_path, "gpu-a", "--engine", "sim", "--sim-load-seconds", "0.2")
        wait_for(lambda: Agent.objects.filter(agent_id="gpu-a").exists(), 30, "registration")
        actions.register_catalog_model(
            "org/tiny", checkpoint, size_bytes=1, keep_alive=timedelta(seconds=2)
        )
        _, raw_key = make_api_key("metrics")
        client = openai.OpenAI(base_url=f"{plane.url}/v1", api_key=raw_key, max_retries=0)
        client.chat.completions.create(model="org/tiny", messages=HELLO, max_tokens=2)  # cold
        client.chat.completions.create(model="org/tiny", messages=HELLO, max_tokens=2)  # warm
        wait_for(
            lambda: Placement.objects.get().cache_level != CacheLevel.GPU_RESIDENT, 30, "eviction"
        )
        wait_for(lambda: "llmfleet_evictions_total" in scrape(plane.url), 10, "the eviction")
        metrics = scrape(plane.url)
        text = requests.get(f"{plane.url}/metrics", timeout=10, headers=SCRAPER).text
    expected = {
        "llmfleet_requests_total": {("model", "status")},
        "llmfleet_request_duration_seconds_bucket": {("le", "model", "start")},
        "llmfleet_time_to_first_token_seconds_count": {("model", "start")},
        "llmfleet_cold_starts_total": {("outcome",)},
        "llmfleet_cold_start_phase_seconds_sum": {("phase",)},
        "llmfleet_cold_start_phase_seconds_count": {("phase",)},
        "llmfleet_loads_total": {("from_level",)},
        "llmfleet_evictions_total": {("to_level", "trigger")},
        "llmfleet_agents": {("state",)},
        "llmfleet_placements": {("cache_level", "model")},
        "llmfleet_agent_gpu_memory_free_bytes": {("agent",)},
        "llmfleet_agent_engine_queue_length": {("agent",)},
    }
    for name, labels in expected.items():
        assert metrics.get(name) == labels, (name, metrics.get(name))
    assert 'llmfleet_requests_total{model="org/tiny",status="200"} 2.0' in text
    assert 'llmfleet_time_to_first_token_seconds_count{model="org/tiny",start="cold"} 1.0' in text
    assert 'llmfleet_time_to_first_token_seconds_count{model="org/tiny",start="warm"} 1.0' in text
    assert 'llmfleet_cold_starts_total{outcome="succeeded"} 1.0' in text
