"""The routes petseg's servers serve and the role each needs: one table per protocol, deny by default.

Both servers are frameworks that register more routes than petseg serves: the
Seldon Core wrapper's Flask app has ``/transform-input``, ``/route``,
``/aggregate``, ``/seldon.json`` and a catch-all static route; MLServer's
FastAPI app has streaming, ``generate`` and documentation routes. The edges
(`petseg.serving.seldon_http`, `petseg.serving.v2_http`) decide every request
before the framework does, from the framework's own route table and these:

- a path that no route of the table here matches answers 404, even where the
  framework has a route for it (a route a later version adds is not served
  until it is listed here);
- a listed route asked with a method its framework route does not take answers 405;
- a listed route's role is the token role it needs (`petseg.tokens`); `OPEN`
  ones (health, readiness, the Open Inference Protocol's model metadata) need none.

The endpoint front (`petseg.entrypoints.endpoint_proxy`) forwards without a
token only the paths `is_open` admits, and the metrics ports need `METRICS_ROLE`.
"""

from __future__ import annotations

import functools
import re

from petseg.errors import ServingError
from petseg.tokens import AccessDenied, TokenTable

OPEN = None
"""The role of a route anyone may call."""
PREDICT, FEEDBACK, OPERATOR = "predict", "feedback", "operator"
METRICS_ROLE = OPERATOR
"""Who may read a server's Prometheus metrics port."""

SELDON: dict[str, str | None] = {
    "/api/v1.0/predictions": PREDICT, "/api/v0.1/predictions": PREDICT, "/predict": PREDICT,
    "/api/v1.0/feedback": FEEDBACK, "/api/v0.1/feedback": FEEDBACK, "/send-feedback": FEEDBACK,
    "/api/v1.0/metadata": PREDICT, "/metadata": PREDICT,
    "/health/ping": OPEN, "/health/status": OPEN, "/api/v1.0/health/status": OPEN,
}
"""The Seldon server's routes (Flask rules of ``seldon_core.wrapper``) and their roles."""

V2_FEEDBACK = "/v2/models/{model_name}/feedback"
"""The one route the Open Inference Protocol edge answers itself (MLServer has none for feedback)."""

V2: dict[str, str | None] = {
    "/v2/health/live": OPEN, "/v2/health/ready": OPEN,
    "/v2/models/{model_name}/ready": OPEN, "/v2/models/{model_name}/versions/{model_version}/ready": OPEN,
    "/v2/models/{model_name}": OPEN, "/v2/models/{model_name}/versions/{model_version}": OPEN,
    "/v2": PREDICT,
    "/v2/models/{model_name}/infer": PREDICT, "/v2/models/{model_name}/versions/{model_version}/infer": PREDICT,
    V2_FEEDBACK: FEEDBACK,
    "/v2/repository/index": OPERATOR, "/v2/repository/models/{model_name}/load": OPERATOR,
    "/v2/repository/models/{model_name}/unload": OPERATOR,
}
"""The Open Inference Protocol server's routes (Starlette paths of MLServer's app) and their roles."""


class NotServed(ServingError):
    """A request no served route takes: 404 (no such route here) or 405 (``allowed`` are the methods it takes).

    Args:
        path: The request's path.
        method: The request's method.
        allowed: The methods the served routes at ``path`` take; empty: none matches the path.
    """

    def __init__(self, path: str, method: str, allowed: set[str]):
        self.status = 405 if allowed else 404
        self.reason = "METHOD_NOT_ALLOWED" if allowed else "NOT_FOUND"
        self.allowed = ", ".join(sorted(allowed))
        super().__init__(f"{path[:100]} takes {self.allowed}, not {method[:20]}" if allowed
                         else f"this server serves no route {path[:100]!r}")


def decide(path: str, method: str, table: dict[str, str | None], registered: dict[str, set[str]]) -> str:
    """The route of ``table`` that serves a request, from a server's own route table.

    Args:
        path: The request's path.
        method: Its method.
        table: The routes served and their roles (`SELDON`, `V2`, or a metrics port's).
        registered: The routes the server's framework registered, by template, with their methods.

    Returns:
        The template of the route, a key of ``table``.

    Raises:
        NotServed: 404 when no route of both tables matches the path, 405 when none takes the method.
    """
    allowed = set()
    for template, methods in registered.items():
        if template in table and pattern(template).match(path):
            methods = set(methods) - {"OPTIONS"}  # no CORS preflight: clients of a model server are programs
            if method in methods:
                return template
            allowed |= methods
    raise NotServed(path, method, allowed)


def authorize(tokens: TokenTable | None, authorization: str | None, *, role: str | None) -> str | None:
    """The identity behind a request's ``Authorization`` header for a route that needs ``role``; None for an
    `OPEN` route, and for a ``predict`` route of a server without tokens.

    Raises:
        AccessDenied: 401 or 403 (any role but ``predict`` on a server without tokens: 401).
    """
    if role is OPEN:
        return None
    if tokens is None:
        if role == PREDICT:
            return None
        raise AccessDenied(401, f"this request needs a bearer token with role {role!r}, and this server has none "
                                "(start it with PETSEG_TOKENS_FILE; petseg serve makes one)")
    return tokens.check(authorization, role).identity


@functools.lru_cache(maxsize=None)
def pattern(template: str) -> re.Pattern:
    """A route template (``/v2/models/{model_name}``, or a Flask rule without variables) as a regular
    expression of whole paths: a ``{name}`` is one path segment."""
    parts = re.split(r"(\{[^}]+\})", template)
    return re.compile("".join("[^/]+" if part.startswith("{") else re.escape(part) for part in parts) + r"\Z")


def is_open(path: str) -> bool:
    """Whether a request path is one of either protocol's open routes (health, readiness, OIP model metadata)."""
    return any(pattern(template).match(path) for table in (SELDON, V2)
               for template, role in table.items() if role is OPEN)
