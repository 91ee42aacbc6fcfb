"""HTTP side of progressive delivery: /admin/rollouts (status and operator actions), /admin/experiments/{route}
(the A/B report) and POST /v1/feedback. Admin endpoints call `proxy/admin.py`'s guard first; feedback is a
client endpoint (client keys apply, bad input gets OpenAI-shaped 400/404). `rollout_document` is also the
status page's view of a rollout. `add_delivery_routes` is called once by `app.py`.
"""

from __future__ import annotations

import math
from typing import Any

import orjson
from aiohttp import web

from proxy.admin import require_admin, timestamp
from proxy.config.model import Route
from proxy.context import CONTEXT
from proxy.delivery.experiments import experiment_report
from proxy.delivery.state import OPERATOR_ACTIONS, RolloutState, candidate_percent
from proxy.errors import InvalidFeedbackError, MalformedBodyError, UnknownRequestError, UnknownRouteError
from proxy.pipeline.handler import check_client_key, read_body

MAX_FEEDBACK_BYTES = 4096  # {"request_id": ..., "score": ...} is a few dozen bytes
MAX_REQUEST_ID_LENGTH = 128  # as accepted from X-Request-Id (`pipeline/errors.py`)
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
    context = request.app[CONTEXT]
    controller = context.rollouts
    documents = [rollout_document(route, await controller.read(route))
                 for route in context.rules.current.routes if route.rollout is not None]
    return web.json_response({"replica": controller.replica_id, "leader": controller.is_leader,
                              "rollouts": documents})


async def rollout(request: web.Request) -> web.Response:
    require_admin(request)
    controller = request.app[CONTEXT].rollouts
    route = controller.route(request.match_info["route"])
    document = rollout_document(route, await controller.read(route))
    return web.json_response(dict(document, replica=controller.replica_id, leader=controller.is_leader))


async def rollout_action(request: web.Request) -> web.Response:
    """POST /admin/rollouts/{route}/{pause|resume|promote|abort}: the new state (409 if the status forbids it)."""
    require_admin(request)
    controller = request.app[CONTEXT].rollouts
    route, state = await controller.act(request.match_info["route"], request.match_info["action"])
    document = rollout_document(route, state)
    return web.json_response(dict(document, replica=controller.replica_id, leader=controller.is_leader))


async def experiment(request: web.Request) -> web.Response:
    """GET /admin/experiments/{route}: the A/B report against the rollout's baseline, else the first variant."""
    require_admin(request)
    context = request.app[CONTEXT]
    name = request.match_info["route"]
    route = next((r for r in context.rules.current.routes if r.name == name), None)
    stats = context.stats.variants(name)
    if route is None and not stats:
        raise UnknownRouteError(f"No route `{name[:128]}` in the running rules or in this process's statistics.")
    if route is not None:
        variants = context.weights.variants_for(route)
        baseline = route.rollout.baseline if route.rollout is not None else route.variants[0].name
        confidence = route.rollout.confidence if route.rollout is not None else DEFAULT_CONFIDENCE
    else:  # a route a reload removed: what it served since start
        variants, baseline, confidence = (), next(iter(stats)), DEFAULT_CONFIDENCE
    report = experiment_report(name, variants, stats, context.feedback.totals(name), baseline, confidence)
    return web.json_response(report, dumps=_dumps)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


async def feedback(request: web.Request) -> web.Response:
    """POST /v1/feedback {"request_id": <x-request-id of an answer>, "score": <number>}: joined to the variant
    that served it; a second score for the same request replaces the first."""
    context = request.app[CONTEXT]
    check_client_key(context, request)
    body = await read_body(request, MAX_FEEDBACK_BYTES)
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise MalformedBodyError("We could not parse the JSON body of your request.") from None
    if not isinstance(data, dict):
        raise MalformedBodyError("The request body must be a JSON object.")
    request_id = data.get("request_id")
    if not isinstance(request_id, str) or not request_id or len(request_id) > MAX_REQUEST_ID_LENGTH:
        raise InvalidFeedbackError("`request_id` must be the x-request-id of an answered request (a non-empty "
                                   f"string of at most {MAX_REQUEST_ID_LENGTH} characters).")
    score = data.get("score")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise InvalidFeedbackError("`score` must be a finite number.")
    served = context.feedback.score(request_id, float(score))
    if served is None:
        raise UnknownRequestError("No such request_id among the requests this server answered recently.")
    return web.json_response({"object": "feedback", "request_id": request_id, "route": served[0],
                              "variant": served[1], "score": float(score)})


def add_delivery_routes(app: web.Application) -> None:
    app.router.add_get("/admin/rollouts", rollouts)
    app.router.add_get("/admin/rollouts/{route}", rollout)
    app.router.add_post("/admin/rollouts/{route}/{action:" + "|".join(OPERATOR_ACTIONS) + "}", rollout_action)
    app.router.add_get("/admin/experiments/{route}", experiment)
    app.router.add_post("/v1/feedback", feedback)
