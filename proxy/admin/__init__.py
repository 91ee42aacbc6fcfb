"""The admin surface (floor 3): JSON under /admin/* for operators and scripts, behind one guard.

`guard.py` (who may call), `rules.py` (the running rules, reload), `rollouts.py` (rollouts and the A/B
report). Handlers read parts through their app keys and never write state except through the parts'
own operations (reload, rollout actions). `add_admin_routes` is called once by `app.py`.
"""

from __future__ import annotations

from aiohttp import web

from proxy.admin.rollouts import add_rollout_routes
from proxy.admin.rules import add_rules_routes


def add_admin_routes(app: web.Application) -> None:
    add_rules_routes(app)
    add_rollout_routes(app)  # /admin/rollouts, /admin/experiments
