"""The fault suite (tests/e2e/faults.py): one fault at a time under steady mixed traffic. No
request fails once the fault heals, none fails during a fault that leaves every request
answerable, every error a client sees has OpenAI's shape, and nothing is left stuck."""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import pytest

from tests.e2e import netns
from tests.e2e.fault_world import Fault
from tests.e2e.faults import FAULTS, heartbeat_interval, run_fault

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.timeout(600)]


@pytest.mark.parametrize("fault", FAULTS, ids=[fault.name for fault in FAULTS])
def test_the_fleet_survives(fault: Fault, settings, tmp_path) -> None:
    if fault.netns and (missing := netns.available()):
        pytest.skip(missing)
    report = run_fault(fault, settings, tmp_path)
    print(report.line())
    if path := os.environ.get("FAULTS_REPORT"):  # bench/faults.py gathers the reports
        with open(path, "a") as out:
            out.write(json.dumps({**asdict(report), "survived": report.survived}) + "\n")
    assert report.failed_after_heal == 0, report.errors
    assert report.badly_shaped == 0, report.errors
    assert report.stuck == 0
    if fault.answerable:
        assert report.failed_while_faulted == 0, report.errors
    assert report.unexpected == 0, report.errors  # only what the fault explains
    if fault.converge:  # no model above max_replicas, the agent reconciled: within two beats
        assert report.converge_s <= 2 * heartbeat_interval(fault), report.line()
    if fault.flaps_allowed is not None:
        assert report.flaps <= fault.flaps_allowed, report.line()
    assert report.survived
