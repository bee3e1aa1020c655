"""`python manage.py agent_credential {rotate,revoke,allow-enrolment} AGENT_ID`."""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from agents import actions
from agents.models import Agent


class Command(BaseCommand):
    help = (
        "Rotate an agent's credential (the agent takes the new one first), revoke it (the agent "
        "goes OFFLINE and cannot enrol again), or allow a revoked agent to enrol again."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("operation", choices=["rotate", "revoke", "allow-enrolment"])
        parser.add_argument("agent_id")

    def handle(self, *args: Any, operation: str, agent_id: str, **options: Any) -> None:
        if not Agent.objects.filter(agent_id=agent_id).exists():
            raise CommandError(f"no agent {agent_id!r}")
        try:
            if operation == "rotate":
                agent = actions.rotate_agent_credential(agent_id)
                self.stdout.write(
                    f"{agent_id}: rotated (sha256:{agent.credential_fingerprint[:12]})"
                )
            elif operation == "revoke":
                actions.revoke_agent_credential(agent_id)
                self.stdout.write(f"{agent_id}: revoked; it is OFFLINE and cannot enrol again")
            else:
                actions.allow_enrolment(agent_id)
                self.stdout.write(f"{agent_id}: may enrol again with the enrolment token")
        except actions.CredentialError as exc:
            raise CommandError(str(exc)) from None
