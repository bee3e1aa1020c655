"""The agents: GPU hosts running the node agent, as registration and heartbeats leave them."""

from __future__ import annotations

from django.db import models

from agents.choices import UNROUTABLE_AGENT_STATES, AgentState
from agents.validators import validate_agent_id, validate_base_url, validate_labels


class Agent(models.Model):
    """A GPU host running the node agent (`python -m nodeagent`).

    Rows are created and refreshed by the agent's registration and by
    heartbeats; the GPU and engine figures are the latest it reported.
    """

    agent_id = models.CharField(max_length=128, unique=True, validators=[validate_agent_id])
    base_url = models.CharField(
        max_length=500,
        validators=[validate_base_url],
        help_text="Where the control plane reaches the agent.",
    )
    state = models.CharField(max_length=16, choices=AgentState.choices, default=AgentState.IDLE)
    reported_state = models.CharField(
        max_length=16,
        choices=AgentState.choices,
        default=AgentState.IDLE,
        help_text="What the agent last said of itself; `state` adds health and draining.",
    )
    drained_at = models.DateTimeField(
        null=True, blank=True, help_text="Set while an operator has the agent draining."
    )
    version = models.CharField(max_length=64, blank=True)
    labels = models.JSONField(default=dict, blank=True, validators=[validate_labels])

    gpus = models.JSONField(default=list, blank=True, help_text="Per-GPU facts from NVML.")
    gpu_name = models.CharField(max_length=128, blank=True)
    gpu_count = models.PositiveSmallIntegerField(default=0)
    gpu_memory_total = models.BigIntegerField(default=0, help_text="Bytes, all GPUs.")
    gpu_memory_free = models.BigIntegerField(default=0, help_text="Bytes, all GPUs.")
    gpu_utilization = models.FloatField(null=True, blank=True, help_text="Percent, mean of GPUs.")
    engine_queue_length = models.PositiveIntegerField(default=0)

    last_heartbeat_at = models.DateTimeField(null=True, blank=True)
    heartbeat_failures = models.PositiveIntegerField(default=0)
    contract_version = models.CharField(
        max_length=16, blank=True, help_text="The agent contract's major.minor it last spoke."
    )
    contract_error = models.TextField(
        blank=True, help_text="Why its last answer was refused (outside the contract), if it was."
    )
    contract_error_at = models.DateTimeField(null=True, blank=True)
    contract_rejections = models.PositiveIntegerField(
        default=0, help_text="Answers refused as outside the contract, ever."
    )

    # The agent's own credential (agents.credentials): derived from this nonce, found by its
    # fingerprint; neither is the credential. Empty: not enrolled, or revoked.
    credential_nonce = models.CharField(max_length=64, blank=True, editable=False)
    credential_fingerprint = models.CharField(
        max_length=64, blank=True, editable=False, db_index=True
    )
    credential_issued_at = models.DateTimeField(null=True, blank=True, editable=False)
    # When the agent first spoke with its credential (a registration, or an answered poll):
    # until then its enrolment answer may have been lost, so it may enrol again.
    credential_confirmed_at = models.DateTimeField(null=True, blank=True, editable=False)
    # A rotation under way: the agent keeps the credential of this nonce only once the control
    # plane confirms it is the one it issues (a caller holding the current one cannot rotate
    # the agent to a credential of its own).
    credential_pending_nonce = models.CharField(
        max_length=64, blank=True, editable=False, db_default=""
    )
    # The nonce of a revoked credential, kept until the agent was told to forget it (told again
    # and again while it cannot be reached: a credential that leaked must reach nothing there).
    credential_revoked_nonce = models.CharField(
        max_length=64, blank=True, editable=False, db_default=""
    )
    credential_revoked_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="Set while the credential is revoked: the agent_id cannot enrol again until "
        "an operator allows it.",
    )
    registered_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["agent_id"]
        indexes = [models.Index(fields=["state"], name="agent_state")]
        permissions = [
            (
                "manage_agent_credentials",
                "Can rotate and revoke agents' credentials and let revoked agents enrol again",
            ),
        ]

    def __str__(self) -> str:
        return self.agent_id

    @property
    def is_routable(self) -> bool:
        return self.state not in UNROUTABLE_AGENT_STATES

    @property
    def credential(self) -> str:
        """What the control plane presents when it calls this agent ("" when not enrolled)."""
        from agents import credentials

        if not self.credential_nonce:
            return ""
        return credentials.derive(self.agent_id, self.credential_nonce)
