"""The JSON Schema of rule files (`rules.schema.json`, draft 2020-12): loaded once, read for key sets.

The schema is the one list of the keys each section allows: editors validate against it, and
`config/loader.py` takes its known-key sets (unknown-key and did-you-mean messages) from here. Pure data:
no validation happens here (the loader's own checks give better messages and resolve references).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

SCHEMA_FILE = "rules.schema.json"

RULES_SCHEMA: dict[str, Any] = json.loads(
    resources.files("proxy.config").joinpath(SCHEMA_FILE).read_text(encoding="utf-8")
)


def allowed_keys(definition: str | None = None) -> tuple[str, ...]:
    """The keys one mapping allows, in schema order: the top level (None) or a `$defs` entry ('route')."""
    node = RULES_SCHEMA if definition is None else RULES_SCHEMA["$defs"][definition]
    return tuple(node["properties"])
