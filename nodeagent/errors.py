"""The error a control or inference request is answered with when the agent cannot carry it out.

Raised by the registry (nodeagent.registry) and the inference proxy (nodeagent.proxy);
the API's error middleware (nodeagent.routes) turns it into the error body and header
of nodeagent.protocol.
"""

from __future__ import annotations


class AgentError(RuntimeError):
    """A request the agent cannot carry out: `code` and HTTP `status` for the error body."""

    def __init__(self, code: str, message: str, status: int, model_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.model_id = model_id
