"""Agent credentials: tokens from the agent policy open only the agent-facing RPCs.

An agent token authenticates a WeOS agent (its identity is the policy entry holding it);
it is not an operator token. With it a caller may watch metrics, read plans and the
suggestion log, and stream suggestions; anything that changes state directly
(SubmitPlan, ActivatePlan, RollbackPlan, DecideSuggestion, ...) answers PERMISSION_DENIED.
A call without an agent token goes on to the operator check (`BearerTokenInterceptor`),
or is let through when the server has no operator tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import grpc

from services.handlers import deny_handler

from engine.control.agents import AgentPolicy
from services.auth import OPEN_SERVICES, metadata_bearer

_SERVICE = "/planengine.v1.ControlPlane/"
AGENT_METHODS = frozenset(_SERVICE + m for m in (
    "Suggest", "WatchMetrics", "GetMetrics", "GetActivePlan", "GetPlan", "ListPlans", "PlanHistory",
    "ListSuggestions"))


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The token of an `authorization: Bearer <token>` metadata entry, if any (scheme in any case)."""
    return metadata_bearer(metadata)


class AgentAuthInterceptor(grpc.ServerInterceptor):
    """Lets agent tokens reach AGENT_METHODS only; hands every other call to `operators`."""

    def __init__(self, policy: AgentPolicy, operators: grpc.ServerInterceptor | None = None):
        self.policy = policy
        self.operators = operators

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        agent = self.policy.authenticate(bearer_token(details.invocation_metadata))
        if agent is None:
            return self.operators.intercept_service(continuation, details) if self.operators else continuation(details)
        if details.method in AGENT_METHODS or details.method.startswith(OPEN_SERVICES):
            return continuation(details)
        handler = continuation(details)
        message = (f"agent {agent.id!r} may not call {details.method}: an agent token opens only "
                   f"{', '.join(sorted(m.removeprefix(_SERVICE) for m in AGENT_METHODS))}")
        return deny_handler(handler, grpc.StatusCode.PERMISSION_DENIED, message)
