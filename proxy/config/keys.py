"""The keys each rule-file mapping allows, and the defaults the builders share.

The key sets come from the JSON Schema (proxy/config/rules.schema.json), the one list editors and the
loader share: a new key goes there first (tests/unit/test_schema.py checks both agree).
"""

from __future__ import annotations

from proxy.config.model import Pool, Rollout, Shadow
from proxy.config.schema import RULES_SCHEMA, allowed_keys

RULE_SUFFIXES = (".yaml", ".yml")
TOP_KEYS = allowed_keys()
SERVER_KEYS = allowed_keys("server")
HEALTH_KEYS = allowed_keys("health")
RETRY_KEYS = allowed_keys("retry")
SHADOW_KEYS = allowed_keys("shadow")
CACHE_KEYS = allowed_keys("cache")
DEFAULTS_KEYS = allowed_keys("defaults")
TIMEOUT_KEYS = allowed_keys("timeouts")
BACKEND_KEYS = allowed_keys("backend")
TLS_KEYS = allowed_keys("tls")
HEADERS_KEYS = allowed_keys("headers")
POOL_KEYS = allowed_keys("pool")
ROUTE_KEYS = allowed_keys("route")
MATCH_KEYS = allowed_keys("match")
SPLIT_KEYS = allowed_keys("split")
VARIANT_KEYS = allowed_keys("variant")
STICKY_KEYS = allowed_keys("sticky")
BALANCE_KEYS = tuple(RULES_SCHEMA["$defs"]["balance"]["anyOf"][1]["properties"])
ROLLOUT_KEYS = allowed_keys("rollout")
FEEDBACK_KEYS = allowed_keys("feedback")
WEBHOOK_KEYS = allowed_keys("webhook")
TENANT_KEYS = allowed_keys("tenant")
TENANT_LIMIT_KEYS = allowed_keys("tenant_limits")

SHADOW_DEFAULTS = Shadow(pool=Pool(name="", backends=()))
ROLLOUT_DEFAULTS = Rollout(candidate="", baseline="")
DEFAULT_RETRY_ATTEMPTS = 3
STICKY_BY_FIXED = ("body:user", "api_key", "none")
