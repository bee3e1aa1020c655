"""Per-agent credentials: derived, never stored.

An agent's credential is an HMAC of its agent_id and a random per-agent nonce under
`AGENT_CREDENTIAL_KEY`. The database keeps the nonce and a SHA-256 fingerprint (to find
the agent a credential belongs to), never the credential, so a copy of the database alone
lets nobody speak for an agent or to one; the control plane re-derives the credential
whenever it calls the agent. Rotating draws a new nonce; revoking clears it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from django.conf import settings

PREFIX = "lfa_"


def new_nonce() -> str:
    return secrets.token_hex(32)


def derive(agent_id: str, nonce: str) -> str:
    """The credential of `agent_id` for this nonce: what the agent presents and is called with."""
    mac = hmac.new(
        settings.AGENT_CREDENTIAL_KEY.encode(),
        f"llmfleet agent credential\0{agent_id}\0{nonce}".encode(),
        hashlib.sha256,
    )
    return PREFIX + mac.hexdigest()


def fingerprint(credential: str) -> str:
    """What the database keeps of a credential (it has 256 bits of entropy: no slow hash
    needed, and a fast one lets every request be looked up by it)."""
    return hashlib.sha256(credential.encode()).hexdigest()


def looks_like_credential(token: str) -> bool:
    return token.startswith(PREFIX) and len(token) == len(PREFIX) + 64
