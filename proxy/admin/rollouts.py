"""HTTP side of progressive delivery: /admin/rollouts (status and operator actions) and
/admin/experiments/{route} (the A/B report). Every handler calls the admin guard first. `rollout_document`
is also the status page's view of a rollout. (Client feedback, POST /v1/feedback, is `pipeline/feedback.py`.)
Numbers come from the fleet's pooled statistics (`observe/pooled.py`), so every replica answers the same and
says how many replicas contributed.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.admin.guard import admin_json, require_admin
from proxy.admin.rules import timestamp
from proxy.config.model import RULES, Route
from proxy.delivery.analysis import Analysis
from proxy.delivery.controller import ROLLOUTS, RolloutController
from proxy.delivery.experiments import REPORT_SECONDS, experiment_report
from proxy.delivery.state import OPERATOR_ACTIONS, PAUSED, RUNNING, RolloutState, candidate_percent
from proxy.delivery.weights import WEIGHTS
from proxy.errors import StatsUnavailableError, StoreUnavailableError, UnknownRouteError
from proxy.observe.pooled import POOLED

DEFAULT_CONFIDENCE = 0.95  # the A/B report's level for routes without a rollout
_SCHEDULED = (RUNNING, PAUSED)  # statuses with a next analysis (awaiting_promotion waits for an operator)


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
        "confirm_promotion": rollout.confirm_promotion,
        "webhooks": len(rollout.webhooks),  # how many (their URLs may carry tokens)
        "digest": rollout.digest,
        # pending: the candidate is not up yet; awaiting_promotion: the last step passed, an operator promotes
        "status": state.status if state is not None else "pending",
        "step": state.step if state is not None else None,  # index into steps
        "percent": candidate_percent(state, rollout),
        "since": timestamp(state.since) if state is not None else None,
        "due": timestamp(state.due) if state is not None and state.status in _SCHEDULED else None,
        "version": state.version if state is not None else None,
        "history": [dict(entry, at=timestamp(entry["at"])) for entry in state.history] if state is not None else [],
    }


def evidence_document(analysis: Analysis | None, available: bool = True) -> dict[str, Any] | None:
    """The current step's evidence as the analysis reads it now from the pooled numbers (what the leader will
    decide on): verdict, reason, how many replicas contributed, every number. None without a running or
    paused step; `{"available": false}` when the store cannot answer (the rollout holds meanwhile)."""
    if not available:
        return {"available": False}
    if analysis is None:
        return None
    return {"available": True, "verdict": analysis.verdict, "reason": analysis.reason,
            "replicas": analysis.numbers.get("replicas"), "numbers": analysis.numbers}


async def _with_evidence(controller: RolloutController, route: Route) -> dict[str, Any]:
    state = await controller.read(route)
    try:
        evidence = evidence_document(await controller.evidence(route, state))
    except StoreUnavailableError:
        evidence = evidence_document(None, available=False)
    return dict(rollout_document(route, state), evidence=evidence)


async def rollouts(request: web.Request) -> web.Response:
    require_admin(request)
    controller = request.app[ROLLOUTS]
    documents = [await _with_evidence(controller, route)
                 for route in request.app[RULES].current.routes if route.rollout is not None]
    return admin_json({"replica": controller.replica_id, "leader": controller.is_leader,
                              "rollouts": documents})


async def rollout(request: web.Request) -> web.Response:
    require_admin(request)
    controller = request.app[ROLLOUTS]
    route = controller.route(request.match_info["route"])
    document = await _with_evidence(controller, route)
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
    pooled = request.app[POOLED]
    now = pooled.now()
    try:
        [numbers] = (await pooled.read([name], [(now - REPORT_SECONDS, now)])).routes[name]
    except StoreUnavailableError as exc:
        raise StatsUnavailableError("The store holding the fleet's statistics does not answer; try again.") from exc
    if route is None and not numbers.variants:
        raise UnknownRouteError(f"No route `{name[:128]}` in the running rules or in the fleet's statistics.")
    if route is not None:
        variants = request.app[WEIGHTS].variants_for(route)
        baseline = route.rollout.baseline if route.rollout is not None else route.variants[0].name
        confidence = route.rollout.confidence if route.rollout is not None else DEFAULT_CONFIDENCE
    else:  # a route a reload removed: what it served in the span
        variants, baseline, confidence = (), min(numbers.variants), DEFAULT_CONFIDENCE
    report = experiment_report(name, variants, numbers, baseline, confidence)
    report["span"] = {"start": timestamp(numbers.start), "end": timestamp(min(numbers.end, now))}
    return admin_json(report)


def add_rollout_routes(app: web.Application) -> None:
    app.router.add_get("/admin/rollouts", rollouts)
    app.router.add_get("/admin/rollouts/{route}", rollout)
    app.router.add_post("/admin/rollouts/{route}/{action:" + "|".join(OPERATOR_ACTIONS) + "}", rollout_action)
    app.router.add_get("/admin/experiments/{route}", experiment)
