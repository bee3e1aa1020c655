"""This agent's own credential: issued by the control plane at enrolment, kept on disk.

The agent enrols once with the fleet's enrolment token (`--token`) and gets back a
credential only it holds. From then on it presents that credential to the control
plane, and takes calls only from a caller that presents it (the control plane derives
it; no other agent knows it). A rotation hands it a new one; the previous one is still
taken until `GRACE_SECONDS` after the first call with the new one, so calls already under
way with it finish, and a rotation whose answer was lost leaves both sides agreeing on the
old one (the rotation can then be sent again with it). A revocation makes it forget both.
An agent without a control plane (`--control-plane-url` unset) takes its `--token` alone.
"""

from __future__ import annotations

import hmac
import logging
import os
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

GRACE_SECONDS = 300.0
PREFIX = "lfa_"


def well_formed(credential: str) -> bool:
    return credential.startswith(PREFIX) and len(credential) == len(PREFIX) + 64


class Credentials:
    def __init__(self, path: Path, enrolment_token: str, *, standalone: bool) -> None:
        self.path = path
        self.enrolment_token = enrolment_token
        self.standalone = standalone
        self.current = ""
        self._previous = ""
        # None: the current credential has not been presented yet (the previous one stands).
        self._previous_until: float | None = None

    def load(self) -> None:
        """The credential kept from an earlier enrolment, if any."""
        try:
            text = self.path.read_text().strip()
        except FileNotFoundError:
            return
        if well_formed(text):
            self.current = text
        else:
            log.warning("ignoring %s: not a credential; the agent enrols again", self.path)

    @property
    def enrolled(self) -> bool:
        return bool(self.current)

    def for_control_plane(self) -> str:
        """What to present to the control plane: the credential, or the enrolment token."""
        return self.current or self.enrolment_token

    def store(self, credential: str) -> None:
        """Keep a new credential (written atomically, mode 0600); the previous one stays
        accepted until GRACE_SECONDS after the new one is first presented."""
        if not well_formed(credential):
            raise ValueError("not a credential the control plane issues")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=self.path.parent, prefix=".credential-")
        try:
            os.fchmod(handle, 0o600)
            os.write(handle, credential.encode() + b"\n")
            os.fsync(handle)
        finally:
            os.close(handle)
        os.replace(name, self.path)
        if self.current and self.current != credential:
            self._previous, self._previous_until = self.current, None
        self.current = credential

    def forget(self) -> None:
        """The credential was revoked: take it (and the previous one) no more."""
        self.current = self._previous = ""
        self.path.unlink(missing_ok=True)

    def accepts(self, token: str) -> bool:
        """Whether a caller presenting `token` may call this agent (constant time)."""
        if self.standalone:
            return _same(token, self.enrolment_token)
        if _same(token, self.current):
            if self._previous and self._previous_until is None:
                self._previous_until = time.monotonic() + GRACE_SECONDS
            return True
        return self._previous_taken() and _same(token, self._previous)

    def may_rotate(self, token: str) -> bool:
        """Whether `token` may hand this agent a new credential: the current one, or the
        previous one while the current was never presented (its rotation's answer was lost,
        so the control plane still holds the previous one)."""
        if self.standalone:
            return False
        if _same(token, self.current):
            return True
        unconfirmed = bool(self._previous) and self._previous_until is None
        return unconfirmed and _same(token, self._previous)

    def _previous_taken(self) -> bool:
        if not self._previous:
            return False
        return self._previous_until is None or time.monotonic() < self._previous_until


def _same(token: str, expected: str) -> bool:
    return bool(expected) and hmac.compare_digest(token.encode(), expected.encode())
