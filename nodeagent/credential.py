"""This agent's own credential: issued by the control plane at enrolment, kept on disk.

The agent enrols once with the fleet's enrolment token (`--token`) and gets back a
credential only it holds. From then on it presents that credential to the control
plane, and takes calls only from a caller that presents it (the control plane derives
it; no other agent knows it). A rotation hands it a new one; the previous one is still
taken for `GRACE_SECONDS`, so calls already under way with it finish. An agent without a
control plane (`--control-plane-url` unset) takes its `--token` alone, as before.
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
        self._previous_until = 0.0

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
        accepted for GRACE_SECONDS."""
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
            self._previous, self._previous_until = self.current, time.monotonic() + GRACE_SECONDS
        self.current = credential

    def forget(self) -> None:
        """The control plane no longer knows this credential (it was revoked, or the fleet's
        database is new): enrol again with the enrolment token."""
        self.current = ""
        self.path.unlink(missing_ok=True)

    def accepts(self, token: str) -> bool:
        """Whether a caller presenting `token` may call this agent (constant time)."""
        if self.standalone:
            return _same(token, self.enrolment_token)
        accepted = _same(token, self.current) if self.current else False
        if self._previous and time.monotonic() < self._previous_until:
            accepted |= _same(token, self._previous)
        return accepted


def _same(token: str, expected: str) -> bool:
    return bool(expected) and hmac.compare_digest(token.encode(), expected.encode())
