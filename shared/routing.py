"""Routes that name themselves in the scope, so metrics and logs label requests by route template.
Apart from `shared.web` so that `shared.apidocs` (which `shared.web` uses) can mount with them too."""

from __future__ import annotations

from starlette.routing import Match, Mount, Route
from starlette.types import Scope


class TemplateRoute(Route):
    """A plain Starlette route (no FastAPI dependency solving, for hot endpoints) that puts itself in
    the scope as FastAPI's routes do, so metrics and logs label requests by route template."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match is not Match.NONE:
            child["route"] = self
        return match, child


class TemplateMount(Mount):
    """A mount (static files) that names itself in the scope like a route, so its requests are labelled
    by its path (e.g. "/portal") in metrics and logs instead of "unmatched"."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match is not Match.NONE:
            child["route"] = self
        return match, child
