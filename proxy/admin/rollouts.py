"""HTTP side of progressive delivery: /admin/rollouts (status and operator actions) and
/admin/experiments/{route} (the A/B report). Every handler calls the admin guard first. `rollout_document`
is also the status page's view of a rollout. (Client feedback, POST /v1/feedback, is `pipeline/feedback.py`.)
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.admin.guard import admin_json, require_admin
from proxy.admin.rules import timestamp
from proxy.config.model import RULES, Route
from proxy.delivery.controller import ROLLOUTS
from proxy.delivery.experiments import experiment_report
from proxy.delivery.state import OPERATOR_ACTIONS, RolloutState, candidate_percent
from proxy.delivery.weights import WEIGHTS
from proxy.errors import UnknownRouteError
from proxy.observe.feedback import FEEDBACK
from proxy.observe.stats import STATS

DEFAULT_CONFIDENCE = 0.95  # the A/B report's level for routes without a rollout


def rollout_document(route: Route, state: RolloutState | None) -> dict[str, Any]:
    """One rollout as operators see it: its rule, where it stands, and every decision with its numbers."""
    rollout = route.rollout
    assert rollout is not None
    return {
        "route": route.name,
        "candidate": rollout.candidate,
        "baseline": rollout.baseline,
        "steps": list(rollout.steps),
        "interval": rollout.interval,
        "min_requests": rollout.min_requests,
        "max_error_rate_delta": rollout.max_error_rate_delta,
        "max_p95_ratio": rollout.max_p95_ratio,
        "max_ttft_p95_ratio": rollout.max_ttft_p95_ratio,
        "confidence": rollout.confidence,
        "digest": rollout.digest,
        "status": state.status if state is not None else "pending",  # pending: the candidate is not up yet
        "step": state.step if state is not None else None,  # index into steps
        "percent": candidate_percent(state, rollout),
        "since": timestamp(state.since) if state is not None else None,
        "due": timestamp(state.due) if state is not None and state.is_active else None,
        "version": state.version if state is not None else None,
        "history": [dict(entry, at=timestamp(entry["at"])) for entry in state.history] if state is not None else [],
    }


async def rollouts(request: web.Request) -> web.Response:
    require_admin(request)
    controller = request.app[ROLLOUTS]
    documents = [rollout_document(route, await controller.read(route))
                 for route in request.app[RULES].current.routes if route.rollout is not None]
    return admin_json({"replica": controller.replica_id, "leader": controller.is_leader,
                              "rollouts": documents})


async def rollout(request: web.Request) -> web.Response:
    require_admin(request)
    controller = request.app[ROLLOUTS]
    route = controller.route(request.match_info["route"])
    document = rollout_document(route, await controller.read(route))
    return admin_json(dict(document, replica=controller.replica_id, leader=controller.is_leader))


async def rollout_action(request: web.Request) -> web.Response:
    """POST /admin/rollouts/{route}/{pause|resume|promote|abort}: the new state (409 if the status forbids it)."""
    require_admin(request)
    controller = request.app[ROLLOUTS]
    route, state = await controller.act(request.match_info["route"], request.match_info["action"])
    document = rollout_document(route, state)
    return admin_json(dict(document, replica=controller.replica_id, leader=controller.is_leader))


async def experiment(request: web.Request) -> web.Response:
    """GET /admin/experiments/{route}: the A/B report against the rollout's baseline, else the first variant."""
    require_admin(request)
    name = request.match_info["route"]
    route = next((r for r in request.app[RULES].current.routes if r.name == name), None)
    stats = request.app[STATS].variants(name)
    if route is None and not stats:
        raise UnknownRouteError(f"No route `{name[:128]}` in the running rules or in this process's statistics.")
    if route is not None:
        variants = request.app[WEIGHTS].variants_for(route)
        baseline = route.rollout.baseline if route.rollout is not None else route.variants[0].name
        confidence = route.rollout.confidence if route.rollout is not None else DEFAULT_CONFIDENCE
    else:  # a route a reload removed: what it served since start
        variants, baseline, confidence = (), next(iter(stats)), DEFAULT_CONFIDENCE
    report = experiment_report(name, variants, stats, request.app[FEEDBACK].totals(name), baseline, confidence)
    return admin_json(report)


def add_rollout_routes(app: web.Application) -> None:
    app.router.add_get("/admin/rollouts", rollouts)
    app.router.add_get("/admin/rollouts/{route}", rollout)
    app.router.add_post("/admin/rollouts/{route}/{action:" + "|".join(OPERATOR_ACTIONS) + "}", rollout_action)
    app.router.add_get("/admin/experiments/{route}", experiment)
