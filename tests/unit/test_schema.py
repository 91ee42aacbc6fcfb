"""The JSON Schema of rule files (proxy/config/rules.schema.json): itself valid, in agreement with the
loader (key sets, enums), accepting every shipped and every valid test rule file, rejecting what the loader
rejects for structural reasons."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from proxy.config import keys as loader  # the key sets the loader and its builders check against
from proxy.config.model import BACKEND_KINDS, BALANCE_POLICIES, ENDPOINTS, WEBHOOK_EVENTS
from proxy.config.schema import RULES_SCHEMA, allowed_keys
from tests.unit.test_loader import BASE, BROKEN, NOT_SHADOWED, VALID

ROOT = Path(__file__).resolve().parents[2]
VALIDATOR = Draft202012Validator(RULES_SCHEMA)


def document(text: str) -> Any:
    parsed = yaml.safe_load(textwrap.dedent(text))
    return {} if parsed is None else parsed  # an empty file is a valid rule file


def test_the_schema_is_a_valid_draft_2020_12_schema() -> None:
    Draft202012Validator.check_schema(RULES_SCHEMA)
    assert RULES_SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"


@pytest.mark.parametrize(
    ("constant", "definition"),
    [
        ("TOP_KEYS", None), ("SERVER_KEYS", "server"), ("DEFAULTS_KEYS", "defaults"), ("HEALTH_KEYS", "health"),
        ("TIMEOUT_KEYS", "timeouts"), ("BACKEND_KEYS", "backend"), ("POOL_KEYS", "pool"), ("ROUTE_KEYS", "route"),
        ("MATCH_KEYS", "match"), ("SPLIT_KEYS", "split"), ("VARIANT_KEYS", "variant"), ("STICKY_KEYS", "sticky"),
        ("RETRY_KEYS", "retry"), ("SHADOW_KEYS", "shadow"), ("CACHE_KEYS", "cache"), ("ROLLOUT_KEYS", "rollout"),
        ("FEEDBACK_KEYS", "feedback"), ("WEBHOOK_KEYS", "webhook"), ("TENANT_KEYS", "tenant"),
        ("TENANT_LIMIT_KEYS", "tenant_limits"), ("TLS_KEYS", "tls"), ("HEADERS_KEYS", "headers"),
    ],
)
def test_key_sets_are_the_loaders(constant: str, definition: str | None) -> None:
    assert getattr(loader, constant) == allowed_keys(definition)


def test_balance_keys_are_the_mapping_forms() -> None:
    assert loader.BALANCE_KEYS == ("policy", "prefix", "by")


def test_every_loader_key_set_is_covered() -> None:
    """A new `*_KEYS` constant in the loader needs its schema definition (and a row above)."""
    covered = {"TOP_KEYS", "SERVER_KEYS", "DEFAULTS_KEYS", "HEALTH_KEYS", "TIMEOUT_KEYS", "BACKEND_KEYS",
               "POOL_KEYS", "ROUTE_KEYS", "MATCH_KEYS", "SPLIT_KEYS", "VARIANT_KEYS", "STICKY_KEYS", "RETRY_KEYS",
               "SHADOW_KEYS", "CACHE_KEYS", "ROLLOUT_KEYS", "FEEDBACK_KEYS", "WEBHOOK_KEYS",
               "TENANT_KEYS", "TENANT_LIMIT_KEYS", "TLS_KEYS", "HEADERS_KEYS", "BALANCE_KEYS"}
    assert {name for name in vars(loader) if name.endswith("_KEYS")} == covered


def test_enums_are_the_models() -> None:
    defs = RULES_SCHEMA["$defs"]
    assert tuple(defs["backend"]["properties"]["kind"]["enum"]) == BACKEND_KINDS
    assert tuple(defs["balance_policy"]["enum"]) == BALANCE_POLICIES
    assert tuple(defs["match"]["properties"]["endpoints"]["items"]["enum"]) == ENDPOINTS
    assert tuple(defs["webhook"]["properties"]["events"]["items"]["enum"]) == WEBHOOK_EVENTS


SHIPPED = sorted([*ROOT.glob("rules/*.yaml"), *ROOT.glob("compose/rules/*.yaml")])


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT)) for p in SHIPPED])
def test_shipped_rule_files_validate(path: Path) -> None:
    VALIDATOR.validate(document(path.read_text()))


def _valid_fixtures() -> list[tuple[str, str]]:
    fixtures = [("BASE", BASE)]
    fixtures += [(f"VALID/{name}", text) for name, text in VALID.items() if name.endswith((".yaml", ".yml"))
                 and not name.startswith(".")]
    for case, first, second in NOT_SHADOWED:
        text = (f"routes:\n  - name: a\n    match: {first}\n    pool: p1\n"
                f"  - name: b\n    match: {second}\n    pool: p1\n")
        fixtures.append((f"NOT_SHADOWED/{case}", text))
    fixtures += [(f"size {raw}", BASE + f"server: {{max_body_bytes: {raw}}}\n") for raw in ("1048576", "16MiB", "10MB")]
    fixtures += [("empty", ""), ("comment", "# nothing yet\n")]
    return fixtures


VALID_FIXTURES = _valid_fixtures()


@pytest.mark.parametrize("text", [t for _, t in VALID_FIXTURES], ids=[n for n, _ in VALID_FIXTURES])
def test_valid_test_fixtures_validate(text: str) -> None:
    VALIDATOR.validate(document(text))


# Loader test cases whose problem is the shape of one file (not references, duplicates across files or
# shadowing, which only the loader sees): the schema must refuse them too.
STRUCTURAL = {
    "unknown route key", "unknown top-level key", "unknown key in nested timeouts", "weight not a number",
    "weight zero", "weight bool", "max_inflight negative", "max_inflight float", "unknown kind",
    "other scheme", "url without scheme", "url with query", "url with fragment", "url with credentials",
    "url missing", "url not a string", "backend not a mapping", "backends not a mapping",
    "pool with empty backends", "pool without backends", "pool lists a backend twice", "pool model not a string",
    "route with pool and split", "route with neither pool nor split", "route without name", "route without match",
    "match without model", "match model empty list", "unknown endpoint", "unknown balance", "bad duration",
    "zero timeout", "split variants missing", "split variant negative weight", "split variant without name",
    "split variants empty", "unknown key in split", "sticky by unknown", "sticky ttl bad",
    "server max_inflight zero", "server max_body_bytes unit", "defaults balance", "top level is a list",
    "top level is a scalar", "routes not a list", "route item not a mapping",
}
STRUCTURAL_CASES = [(name, files) for name, files, _ in BROKEN if name in STRUCTURAL]


def test_structural_cases_still_exist() -> None:
    assert {name for name, _ in STRUCTURAL_CASES} == STRUCTURAL


@pytest.mark.parametrize("files", [f for _, f in STRUCTURAL_CASES], ids=[n for n, _ in STRUCTURAL_CASES])
def test_structurally_broken_files_are_refused(files: dict[str, str]) -> None:
    assert any(not VALIDATOR.is_valid(document(text)) for text in files.values())
