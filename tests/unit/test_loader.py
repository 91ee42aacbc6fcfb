"""Unit tests for `proxy.config.loader` and `proxy.config.durations`: rule files → Snapshot, and every
operator-facing 'file:line: message' the loader produces. Pure: YAML written into pytest's tmp_path."""

from __future__ import annotations

import hashlib
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from proxy.config.durations import parse_duration, parse_size
from proxy.config.globs import glob_covers
from proxy.config.loader import RulesError, load_rules
from proxy.config.model import Backend, Balance, Subject, Pool, Rollout, ServerSettings, Snapshot, Timeouts, Variant

BASE = """\
backends:
  b1: {url: "http://127.0.0.1:8000"}
pools:
  p1: {backends: [b1]}
routes:
  - name: base
    match: {model: base-model}
    pool: p1
"""


def write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(textwrap.dedent(text))
    return directory


def load_errors(directory: Path, env: dict[str, str] | None = None) -> tuple[str, ...]:
    with pytest.raises(RulesError) as caught:
        load_rules(directory, env={} if env is None else env)
    return caught.value.errors


# ------------------------------------------------------------------------------------------- valid set

VALID = {
    "10-backends.yaml": """\
        server:
          max_body_bytes: 512KiB
          max_inflight: 100
          drain_timeout: 5s
        defaults:
          timeouts: {connect: 500ms, total: 5m}
          balance: least_conn
        backends:
          vllm-a: {url: "http://127.0.0.1:8000", kind: vllm, weight: 2, max_inflight: 64}
          ollama-1: {url: "http://127.0.0.1:11434/prefix/", kind: ollama, api_key_env: OLLAMA_KEY}
        pools:
          llama-stable: {backends: [vllm-a], model: "meta-llama/Llama-3.1-8B-Instruct"}
          mixed: {backends: [vllm-a, ollama-1]}
          unused: {backends: [ollama-1]}
        """,
    "20-routes.yml": """\
        routes:
          - name: chat
            match: {model: "llama*", endpoints: [chat, completions]}
            pool: llama-stable
            timeouts: {first_token: 30s}
          - name: canary
            match: {model: [qwen-7b, "mistral-*"]}
            split:
              variants:
                - {name: stable, pool: llama-stable, weight: 90}
                - {name: canary, pool: mixed, weight: 10}
              sticky: {by: "header:x-user-id", ttl: 7d}
            balance: round_robin
            shadow: [{pool: mixed, sample: 0.05}]
            cache: {ttl: 1h}
            rollout: {candidate: canary, baseline: stable, steps: [10, 100], interval: 10m}
        """,
    "30-more.yaml": """\
        routes:
          - name: embed
            match: {model: "*", endpoints: [embeddings]}
            pool: mixed
        """,
    "notes.txt": "not a rule file: ignored",
    ".hidden.yaml": "this: is ignored: too",
}


@pytest.fixture
def valid_dir(tmp_path: Path) -> Path:
    return write(tmp_path / "rules", VALID)


def test_valid_set_loads_into_expected_snapshot(valid_dir: Path) -> None:
    snapshot = load_rules(valid_dir, env={"OLLAMA_KEY": "sekret"}, generation=7)

    vllm = Backend(name="vllm-a", url="http://127.0.0.1:8000", host="127.0.0.1", port=8000, base_path="",
                   kind="vllm", weight=2.0, max_inflight=64)
    ollama = Backend(name="ollama-1", url="http://127.0.0.1:11434/prefix", host="127.0.0.1", port=11434,
                     base_path="/prefix", kind="ollama", api_key="sekret")
    stable = Pool(name="llama-stable", backends=(vllm,), model="meta-llama/Llama-3.1-8B-Instruct")
    mixed = Pool(name="mixed", backends=(vllm, ollama))
    assert snapshot.backends == (vllm, ollama)
    assert snapshot.backends[1].api_key == "sekret"
    assert snapshot.pools == (stable, mixed, Pool(name="unused", backends=(ollama,)))
    assert snapshot.server == ServerSettings(max_body_bytes=512 * 1024, max_inflight=100, drain_timeout=5.0)
    assert snapshot.generation == 7

    chat, canary, embed = snapshot.routes
    assert chat.name == "chat" and chat.models == ("llama*",) and chat.endpoints == ("chat", "completions")
    assert chat.variants == (Variant(name="llama-stable", pool=stable, weight=1.0),)
    assert chat.timeouts == Timeouts(connect=0.5, first_token=30.0, idle=30.0, total=300.0)
    assert chat.balance.policy == "least_conn"
    assert chat.source == f"{valid_dir}/20-routes.yml:2"

    assert canary.models == ("qwen-7b", "mistral-*") and canary.endpoints == ()
    assert canary.variants == (Variant("stable", stable, 90.0), Variant("canary", mixed, 10.0))
    assert canary.balance.policy == "round_robin"
    assert canary.timeouts == Timeouts(connect=0.5, first_token=60.0, idle=30.0, total=300.0)
    assert canary.rollout is not None and len(canary.rollout.digest) == 16
    assert replace(canary.rollout, digest="") == Rollout(candidate="canary", baseline="stable", steps=(10.0, 100.0),
                                                         interval=600.0)
    assert chat.rollout is None
    assert embed.source == f"{valid_dir}/30-more.yaml:2"


def test_files_are_sorted_and_hashed(valid_dir: Path) -> None:
    snapshot = load_rules(valid_dir, env={"OLLAMA_KEY": "k"})
    names = ["10-backends.yaml", "20-routes.yml", "30-more.yaml"]
    assert snapshot.files == tuple(
        (f"{valid_dir}/{name}", hashlib.sha256((valid_dir / name).read_bytes()).hexdigest()) for name in names
    )


def test_directory_given_as_str_with_trailing_slash(valid_dir: Path) -> None:
    snapshot = load_rules(f"{valid_dir}/", env={"OLLAMA_KEY": "k"})
    assert snapshot.files[0][0] == f"{valid_dir}/10-backends.yaml"


def test_env_defaults_to_os_environ(valid_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_KEY", "from-environ")
    assert load_rules(valid_dir).backends[1].api_key == "from-environ"


def test_model_pattern_compiles_all_globs(valid_dir: Path) -> None:
    canary = load_rules(valid_dir, env={"OLLAMA_KEY": "k"}).routes[1]
    assert canary.model_pattern.fullmatch("qwen-7b")
    assert canary.model_pattern.fullmatch("mistral-7b-instruct")
    assert not canary.model_pattern.fullmatch("qwen-7b-chat")
    assert not canary.model_pattern.fullmatch("mistral")


def test_defaults_and_minimal_files(tmp_path: Path) -> None:
    rules = write(tmp_path / "rules", {"a.yaml": BASE, "empty.yaml": "", "comments.yaml": "# nothing yet\n"})
    snapshot = load_rules(rules, env={})
    route = snapshot.routes[0]
    assert snapshot.server == ServerSettings()
    assert route.timeouts == Timeouts() and route.balance == Balance()
    assert snapshot.backends[0] == Backend(name="b1", url="http://127.0.0.1:8000", host="127.0.0.1", port=8000,
                                           base_path="", kind="openai", weight=1.0, max_inflight=0)
    assert snapshot.generation == 0


def test_url_without_port_defaults_to_80(tmp_path: Path) -> None:
    rules = write(tmp_path / "rules", {"a.yaml": BASE.replace("127.0.0.1:8000", "runtime.local/v1/")})
    backend = load_rules(rules, env={}).backends[0]
    assert (backend.host, backend.port, backend.base_path) == ("runtime.local", 80, "/v1")


def test_server_sizes_as_int_and_strings(tmp_path: Path) -> None:
    for raw, expected in [("1048576", 1048576), ("16MiB", 16 * 1024 * 1024), ("10MB", 10_000_000)]:
        rules = write(tmp_path / raw, {"a.yaml": BASE + f"server: {{max_body_bytes: {raw}}}\n"})
        assert load_rules(rules, env={}).server.max_body_bytes == expected


# --------------------------------------------------------------------------------------- broken inputs

# Each case: extra files written next to BASE (as 00-base.yaml), and the one error expected.
# '{dir}' is the rules directory; an expected message ending in '...' is compared as a prefix.
BROKEN: list[tuple[str, dict[str, str], str]] = [
    (
        "unknown route key",
        {"c.yaml": """\
            routes:
              - name: chat
                match: {model: m1}
                pool: p1
                tiemouts: {first_token: 30s}
            """},
        "c.yaml:5: unknown key 'tiemouts' in route 'chat' (did you mean 'timeouts'?)",
    ),
    (
        "unknown top-level key",
        {"c.yaml": "backend:\n  b2: {url: 'http://h:1'}\n"},
        "c.yaml:1: unknown top-level key 'backend' (did you mean 'backends'?)",
    ),
    (
        "unknown key in nested timeouts",
        {"c.yaml": "defaults:\n  timeouts:\n    frist_token: 3s\n"},
        "c.yaml:3: unknown key 'frist_token' in timeouts of defaults (did you mean 'first_token'?)",
    ),
    (
        "duplicate key in one mapping",
        {"c.yaml": "backends:\n  x: {url: 'http://h:1', url: 'http://h:2'}\n"},
        "c.yaml:2: duplicate key 'url' in backend 'x' (first at line 2)",
    ),
    (
        "weight not a number",
        {"c.yaml": "backends:\n  x: {url: 'http://h:1', weight: abc}\n"},
        "c.yaml:2: backend 'x': weight must be a number > 0, got 'abc'",
    ),
    (
        "weight zero",
        {"c.yaml": "backends:\n  x:\n    url: http://h:1\n    weight: 0\n"},
        "c.yaml:4: backend 'x': weight must be a number > 0, got 0",
    ),
    (
        "weight bool",
        {"c.yaml": "backends:\n  x: {url: 'http://h:1', weight: yes}\n"},
        "c.yaml:2: backend 'x': weight must be a number > 0, got True",
    ),
    (
        "max_inflight negative",
        {"c.yaml": "backends:\n  x: {url: 'http://h:1', max_inflight: -1}\n"},
        "c.yaml:2: backend 'x': max_inflight must be an integer >= 0, got -1",
    ),
    (
        "max_inflight float",
        {"c.yaml": "backends:\n  x: {url: 'http://h:1', max_inflight: 1.5}\n"},
        "c.yaml:2: backend 'x': max_inflight must be an integer >= 0, got 1.5",
    ),
    (
        "unknown kind",
        {"c.yaml": "backends:\n  x: {url: 'http://h:1', kind: vlm}\n"},
        "c.yaml:2: backend 'x': kind must be one of vllm, llamacpp, ollama, tgi, openai, got 'vlm' "
        "(did you mean 'vllm'?)",
    ),
    (
        "tls on an http url",
        {"c.yaml": "backends:\n  x: {url: 'http://h:1', tls: {verify: false}}\n"},
        "c.yaml:2: backend 'x': tls needs an https:// url",
    ),
    (
        "other scheme",
        {"c.yaml": "backends:\n  x: {url: 'ftp://h:1'}\n"},
        "c.yaml:2: backend 'x': url 'ftp://h:1' must start with http:// or https://",
    ),
    (
        "url without scheme",
        {"c.yaml": "backends:\n  x: {url: '127.0.0.1:8000'}\n"},
        "c.yaml:2: backend 'x': url '127.0.0.1:8000' must start with http:// or https://",
    ),
    (
        "url with query",
        {"c.yaml": "backends:\n  x: {url: 'http://h:1/v1?x=1'}\n"},
        "c.yaml:2: backend 'x': url 'http://h:1/v1?x=1' must not have a query or fragment",
    ),
    (
        "url with fragment",
        {"c.yaml": "backends:\n  x: {url: 'http://h:1#top'}\n"},
        "c.yaml:2: backend 'x': url 'http://h:1#top' must not have a query or fragment",
    ),
    (
        "url without host",
        {"c.yaml": "backends:\n  x: {url: 'http://:8000'}\n"},
        "c.yaml:2: backend 'x': url 'http://:8000' has no host",
    ),
    (
        "url with bad port",
        {"c.yaml": "backends:\n  x: {url: 'http://h:99999'}\n"},
        "c.yaml:2: backend 'x': url 'http://h:99999' has an invalid port",
    ),
    (
        "url with credentials",
        {"c.yaml": "backends:\n  x: {url: 'http://u:p@h:1'}\n"},
        "c.yaml:2: backend 'x': url 'http://***@h:1' must not contain credentials (use api_key_env)",
    ),
    (
        "url missing",
        {"c.yaml": "backends:\n  x: {kind: vllm}\n"},
        "c.yaml:2: backend 'x': url is required",
    ),
    (
        "url not a string",
        {"c.yaml": "backends:\n  x: {url: 8000}\n"},
        "c.yaml:2: backend 'x': url must be a string like 'http://127.0.0.1:8000', got 8000",
    ),
    (
        "backend not a mapping",
        {"c.yaml": "backends:\n  x: http://h:1\n"},
        "c.yaml:2: backend 'x' must be a mapping with at least 'url', got 'http://h:1'",
    ),
    (
        "backends not a mapping",
        {"c.yaml": "backends:\n  - x\n"},
        "c.yaml:1: backends must be a mapping of backend names to settings, got a list",
    ),
    (
        "api_key_env not set",
        {"c.yaml": "backends:\n  x: {url: 'http://h:1', api_key_env: OLLAMA_KEY}\n"},
        "c.yaml:2: backend 'x': api_key_env 'OLLAMA_KEY' is not set",
    ),
    (
        "api_key_env empty",
        {"c.yaml": "backends:\n  x: {url: 'http://h:1', api_key_env: EMPTY_KEY}\n"},
        "c.yaml:2: backend 'x': api_key_env 'EMPTY_KEY' is set but empty",
    ),
    (
        "api_key_env not a name",
        {"c.yaml": "backends:\n  x: {url: 'http://h:1', api_key_env: 'sk-123 456'}\n"},
        "c.yaml:2: backend 'x': api_key_env must be the name of an environment variable, got 'sk-123 456'",
    ),
    (
        "duplicate backend across files",
        {"c.yaml": "backends:\n  b1: {url: 'http://h:1'}\n"},
        "c.yaml:2: duplicate backend 'b1' (first defined at {dir}/00-base.yaml:2)",
    ),
    (
        "duplicate pool within a file",
        {"c.yaml": "pools:\n  p2: {backends: [b1]}\n  p2: {backends: [b1]}\n"},
        "c.yaml:3: duplicate pool 'p2' (first defined at {dir}/c.yaml:2)",
    ),
    (
        "pool references undefined backend",
        {"c.yaml": "pools:\n  p2: {backends: [b1, nope]}\n"},
        "c.yaml:2: pool 'p2': backend 'nope' is not defined",
    ),
    (
        "pool reference suggests a close name",
        {"c.yaml": "pools:\n  p2:\n    backends: [b11]\n"},
        "c.yaml:3: pool 'p2': backend 'b11' is not defined (did you mean 'b1'?)",
    ),
    (
        "pool with empty backends",
        {"c.yaml": "pools:\n  p2: {backends: []}\n"},
        "c.yaml:2: pool 'p2': backends must be a non-empty list of backend names, got an empty list",
    ),
    (
        "pool without backends",
        {"c.yaml": "pools:\n  p2: {model: m}\n"},
        "c.yaml:2: pool 'p2': backends must be a non-empty list of backend names, got nothing",
    ),
    (
        "pool lists a backend twice",
        {"c.yaml": "pools:\n  p2: {backends: [b1, b1]}\n"},
        "c.yaml:2: pool 'p2': backend 'b1' is listed twice",
    ),
    (
        "pool model not a string",
        {"c.yaml": "pools:\n  p2: {backends: [b1], model: [a]}\n"},
        "c.yaml:2: pool 'p2': model must be a non-empty string, got a list",
    ),
    (
        "route pool undefined",
        {"c.yaml": "routes:\n  - name: chat\n    match: {model: m1}\n    pool: nope\n"},
        "c.yaml:4: route 'chat': pool 'nope' is not defined",
    ),
    (
        "duplicate top-level key in one file",
        {"c.yaml": "routes: []\npools: {}\nroutes: []\n"},
        "c.yaml:3: duplicate top-level key 'routes' (first at line 1)",
    ),
    (
        "split variants missing",
        {"c.yaml": "routes:\n  - name: chat\n    match: {model: m1}\n    split: {sticky: {by: none}}\n"},
        "c.yaml:4: route 'chat': split.variants must be a non-empty list, got nothing",
    ),
    (
        "route with pool and split",
        {"c.yaml": """\
            routes:
              - name: chat
                match: {model: m1}
                pool: p1
                split: {variants: [{name: a, pool: p1}]}
            """},
        "c.yaml:4: route 'chat': needs exactly one of 'pool' or 'split', got both",
    ),
    (
        "route with neither pool nor split",
        {"c.yaml": "routes:\n  - name: chat\n    match: {model: m1}\n"},
        "c.yaml:2: route 'chat': needs exactly one of 'pool' or 'split', got neither",
    ),
    (
        "route without name",
        {"c.yaml": "routes:\n  - match: {model: m1}\n    pool: p1\n"},
        "c.yaml:2: route: name is required",
    ),
    (
        "duplicate route across files",
        {"c.yaml": "routes:\n  - name: base\n    match: {model: other}\n    pool: p1\n"},
        "c.yaml:2: duplicate route 'base' (first defined at {dir}/00-base.yaml:6)",
    ),
    (
        "route without match",
        {"c.yaml": "routes:\n  - name: chat\n    pool: p1\n"},
        "c.yaml:2: route 'chat': match is required (at least match.model)",
    ),
    (
        "match without model",
        {"c.yaml": "routes:\n  - name: chat\n    match: {endpoints: [chat]}\n    pool: p1\n"},
        "c.yaml:3: route 'chat': match.model is required",
    ),
    (
        "match model empty list",
        {"c.yaml": "routes:\n  - name: chat\n    match: {model: []}\n    pool: p1\n"},
        "c.yaml:3: route 'chat': match.model must be a model name or glob, or a non-empty list of them, "
        "got an empty list",
    ),
    (
        "unknown endpoint",
        {"c.yaml": "routes:\n  - name: chat\n    match: {model: m1, endpoints: [chats]}\n    pool: p1\n"},
        "c.yaml:3: route 'chat': match.endpoints: unknown endpoint 'chats' (did you mean 'chat'?), "
        "expected one of chat, completions, embeddings, responses, messages, rerank, score",
    ),
    (
        "unknown balance",
        {"c.yaml": "routes:\n  - name: chat\n    match: {model: m1}\n    pool: p1\n    balance: fastest\n"},
        "c.yaml:5: route 'chat': balance must be one of least_cost, least_conn, round_robin, consistent_hash, got 'fastest'",
    ),
    (
        "bad duration",
        {"c.yaml": """\
            routes:
              - name: chat
                match: {model: m1}
                pool: p1
                timeouts:
                  connect: 1s
                  first_token: soon
            """},
        "c.yaml:7: route 'chat': timeouts.first_token: invalid duration 'soon' (expected seconds...",
    ),
    (
        "zero timeout",
        {"c.yaml": "defaults:\n  timeouts: {connect: 0}\n"},
        "c.yaml:2: defaults: timeouts.connect must be a duration > 0, got 0",
    ),
    (
        "split weights all zero",
        {"c.yaml": """\
            routes:
              - name: chat
                match: {model: m1}
                split:
                  variants:
                    - {name: a, pool: p1, weight: 0}
                    - {name: b, pool: p1, weight: 0}
            """},
        "c.yaml:5: route 'chat': split weights are all 0 (at least one variant needs a weight > 0)",
    ),
    (
        "split variant pool undefined",
        {"c.yaml": """\
            routes:
              - name: chat
                match: {model: m1}
                split:
                  variants:
                    - {name: a, pool: p1, weight: 1}
                    - {name: b, pool: nope, weight: 1}
            """},
        "c.yaml:7: route 'chat' variant 'b': pool 'nope' is not defined",
    ),
    (
        "split variant names repeat",
        {"c.yaml": """\
            routes:
              - name: chat
                match: {model: m1}
                split:
                  variants:
                    - {name: a, pool: p1}
                    - {name: a, pool: p1}
            """},
        "c.yaml:7: route 'chat' variant 'a': name is used twice in this split",
    ),
    (
        "split variant negative weight",
        {"c.yaml": """\
            routes:
              - name: chat
                match: {model: m1}
                split:
                  variants:
                    - {name: a, pool: p1, weight: -1}
            """},
        "c.yaml:6: route 'chat' variant 'a': weight must be a number >= 0, got -1",
    ),
    (
        "split variant without name",
        {"c.yaml": """\
            routes:
              - name: chat
                match: {model: m1}
                split:
                  variants:
                    - {pool: p1}
            """},
        "c.yaml:6: route 'chat' split variant: name is required",
    ),
    (
        "split variants empty",
        {"c.yaml": "routes:\n  - name: chat\n    match: {model: m1}\n    split: {variants: []}\n"},
        "c.yaml:4: route 'chat': split.variants must be a non-empty list, got an empty list",
    ),
    (
        "unknown key in split",
        {"c.yaml": """\
            routes:
              - name: chat
                match: {model: m1}
                split:
                  variants: [{name: a, pool: p1}]
                  stiky: {by: api_key}
            """},
        "c.yaml:6: unknown key 'stiky' in split of route 'chat' (did you mean 'sticky'?)",
    ),
    (
        "sticky by unknown",
        {"c.yaml": """\
            routes:
              - name: chat
                match: {model: m1}
                split:
                  variants: [{name: a, pool: p1}]
                  sticky: {by: cookie}
            """},
        "c.yaml:6: route 'chat': split.sticky.by must be one of 'header:NAME', 'body:user', 'api_key', 'none', "
        "got 'cookie'",
    ),
    (
        "sticky ttl bad",
        {"c.yaml": """\
            routes:
              - name: chat
                match: {model: m1}
                split:
                  variants: [{name: a, pool: p1}]
                  sticky:
                    by: api_key
                    ttl: forever
            """},
        "c.yaml:8: route 'chat': split.sticky.ttl: invalid duration 'forever'...",
    ),
    (
        "duplicate server section across files",
        {"c.yaml": "server:\n  max_inflight: 10\n", "d.yaml": "\nserver:\n  max_inflight: 20\n"},
        "d.yaml:2: duplicate 'server' section (first defined at {dir}/c.yaml:1)",
    ),
    (
        "server max_inflight zero",
        {"c.yaml": "server:\n  max_inflight: 0\n"},
        "c.yaml:2: server: max_inflight must be an integer > 0, got 0",
    ),
    (
        "server max_body_bytes unit",
        {"c.yaml": "server:\n  max_body_bytes: 16 parsecs\n"},
        "c.yaml:2: server: max_body_bytes: invalid size '16 parsecs'...",
    ),
    (
        "defaults balance",
        {"c.yaml": "defaults:\n  balance: least_costs\n"},
        "c.yaml:2: defaults: balance must be one of least_cost, least_conn, round_robin, consistent_hash, got 'least_costs' "
        "(did you mean 'least_cost'?)",
    ),
    (
        "top level is a list",
        {"c.yaml": "- a\n- b\n"},
        "c.yaml:1: top level must be a mapping of sections (server, defaults, health, backends, pools, tenants, routes), "
        "got a list",
    ),
    (
        "top level is a scalar",
        {"c.yaml": "hello\n"},
        "c.yaml:1: top level must be a mapping of sections (server, defaults, health, backends, pools, tenants, routes), "
        "got 'hello'",
    ),
    (
        "routes not a list",
        {"c.yaml": "\nroutes:\n  chat: {pool: p1}\n"},
        "c.yaml:2: routes must be a list of routes, got a mapping",
    ),
    (
        "route item not a mapping",
        {"c.yaml": "routes:\n  - chat\n"},
        "c.yaml:2: route must be a mapping with name, match, and pool or split, got 'chat'",
    ),
    (
        "glob shadowing",
        {"c.yaml": """\
            routes:
              - name: all-llama
                match: {model: "llama*"}
                pool: p1
              - name: l3
                match: {model: [llama-3, "llama-3.1-*"], endpoints: [chat]}
                pool: p1
            """},
        "c.yaml:5: route 'l3' can never match: route 'all-llama' ({dir}/c.yaml:2) matches every model it matches",
    ),
    (
        "shadowing by a catch-all in an earlier file",
        {"c.yaml": "routes:\n  - name: all\n    match: {model: '*'}\n    pool: p1\n",
         "d.yaml": "routes:\n  - name: late\n    match: {model: zephyr}\n    pool: p1\n"},
        "d.yaml:2: route 'late' can never match: route 'all' ({dir}/c.yaml:2) matches every model it matches",
    ),
    (
        "invalid yaml",
        {"c.yaml": "routes:\n  - name: chat\n    match: {model: [a, b}\n"},
        "c.yaml:3: invalid YAML: ...",
    ),
    (
        "tab indentation",
        {"c.yaml": "routes:\n\t- name: chat\n"},
        "c.yaml:2: invalid YAML: ...",
    ),
    (
        "two documents",
        {"c.yaml": "routes: []\n---\nroutes: []\n"},
        "c.yaml:2: invalid YAML: but found another document (expected a single document in the stream)",
    ),
]


@pytest.mark.parametrize(("files", "expected"), [case[1:] for case in BROKEN], ids=[case[0] for case in BROKEN])
def test_broken_input_reports_file_and_line(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    rules = write(tmp_path / "rules", {"00-base.yaml": BASE, **files})
    errors = load_errors(rules, env={"EMPTY_KEY": " "})
    expected = f"{rules}/" + expected.replace("{dir}", str(rules))
    assert len(errors) == 1, errors
    if expected.endswith("..."):
        assert errors[0].startswith(expected[:-3]), errors
    else:
        assert errors[0] == expected


def test_many_errors_reported_together_and_sorted(tmp_path: Path) -> None:
    rules = write(tmp_path / "rules", {
        "a.yaml": """\
            backends:
              x: {url: 'ftp://h:1', weight: abc}
            pools:
              p: {backends: [x, ghost]}
            """,
        "b.yaml": """\
            routes:
              - name: chat
                match: {model: m, endpoints: [chats]}
                pool: nope
                tiemouts: {}
              - name: chat
                match: {model: n}
                pool: p
            """,
    })
    errors = load_errors(rules)
    assert errors == (
        f"{rules}/a.yaml:2: backend 'x': url 'ftp://h:1' must start with http:// or https://",
        f"{rules}/a.yaml:2: backend 'x': weight must be a number > 0, got 'abc'",
        f"{rules}/a.yaml:4: pool 'p': backend 'ghost' is not defined",
        f"{rules}/b.yaml:3: route 'chat': match.endpoints: unknown endpoint 'chats' (did you mean 'chat'?), "
        "expected one of chat, completions, embeddings, responses, messages, rerank, score",
        f"{rules}/b.yaml:4: route 'chat': pool 'nope' is not defined",
        f"{rules}/b.yaml:5: unknown key 'tiemouts' in route 'chat' (did you mean 'timeouts'?)",
        f"{rules}/b.yaml:6: duplicate route 'chat' (first defined at {rules}/b.yaml:2)",
    )


def test_invalid_backend_does_not_cascade_into_undefined_errors(tmp_path: Path) -> None:
    rules = write(tmp_path / "rules", {"a.yaml": BASE.replace("http://127.0.0.1:8000", "ftp://h")})
    errors = load_errors(rules)
    assert len(errors) == 1 and "must start with http:// or https://" in errors[0]


def test_duplicate_backend_body_is_still_validated(tmp_path: Path) -> None:
    duplicate = "backends:\n  b1: {url: 'http://h:1', wieght: 2}\n"
    rules = write(tmp_path / "rules", {"a.yaml": BASE, "b.yaml": duplicate})
    assert load_errors(rules) == (
        f"{rules}/b.yaml:2: duplicate backend 'b1' (first defined at {rules}/a.yaml:2)",
        f"{rules}/b.yaml:2: unknown key 'wieght' in backend 'b1' (did you mean 'weight'?)",
    )


def test_empty_directory(tmp_path: Path) -> None:
    rules = write(tmp_path / "rules", {"README.md": "no rules here"})
    assert load_errors(rules) == (f"{rules}: no rule files (*.yaml) found",)


def test_missing_directory(tmp_path: Path) -> None:
    errors = load_errors(tmp_path / "nope")
    assert errors == (f"{tmp_path}/nope: cannot read rules directory: No such file or directory",)


def test_no_routes_anywhere(tmp_path: Path) -> None:
    rules = write(tmp_path / "rules", {"a.yaml": "backends:\n  b1: {url: 'http://h:1'}\n"})
    assert load_errors(rules) == (f"{rules}: no routes defined in any rule file",)


def test_invalid_utf8(tmp_path: Path) -> None:
    rules = write(tmp_path / "rules", {"a.yaml": BASE})
    (rules / "b.yaml").write_bytes(b"routes: []\n# caf\xe9\n")
    assert load_errors(rules) == (f"{rules}/b.yaml:2: file is not valid UTF-8",)


def test_unparsable_file_alone_is_the_only_error(tmp_path: Path) -> None:
    rules = write(tmp_path / "rules", {"a.yaml": "routes:\n  - name: [chat\n"})
    errors = load_errors(rules)
    assert len(errors) == 1 and errors[0].startswith(f"{rules}/a.yaml:3: invalid YAML: ")


def test_rules_error_message_lists_everything(tmp_path: Path) -> None:
    rules = write(tmp_path / "rules", {"a.yaml": "routes:\n  - chat\n  - chat\n"})
    with pytest.raises(RulesError) as caught:
        load_rules(rules, env={})
    assert str(caught.value).startswith("2 errors in rule files:\n  ")
    assert all(error in str(caught.value) for error in caught.value.errors)


# ---------------------------------------------------------------------------------------- shadowing

NOT_SHADOWED: list[tuple[str, str, str]] = [
    ("'?' does not cover '*'", "{model: 'llama?'}", "{model: 'llama*'}"),
    ("earlier endpoints narrower", "{model: '*', endpoints: [chat]}", "{model: m}"),
    ("earlier endpoints do not cover later", "{model: '*', endpoints: [chat]}",
     "{model: m, endpoints: [chat, embeddings]}"),
    ("only some patterns covered", "{model: 'llama*'}", "{model: [llama-3, qwen]}"),
    ("different suffix", "{model: '*-instruct'}", "{model: '*-chat'}"),
    ("class does not cover literal", "{model: 'llama-[0-2]'}", "{model: llama-3}"),
    ("class inside later glob", "{model: '*y]'}", "{model: '[xy]'}"),
]


@pytest.mark.parametrize(("first", "second"), [c[1:] for c in NOT_SHADOWED], ids=[c[0] for c in NOT_SHADOWED])
def test_not_flagged_when_later_route_can_still_match(tmp_path: Path, first: str, second: str) -> None:
    text = f"routes:\n  - name: a\n    match: {first}\n    pool: p1\n" \
           f"  - name: b\n    match: {second}\n    pool: p1\n"
    rules = write(tmp_path / "rules", {"00-base.yaml": BASE, "c.yaml": text})
    assert [r.name for r in load_rules(rules, env={}).routes] == ["base", "a", "b"]


@pytest.mark.parametrize(
    ("outer", "inner", "covers"),
    [
        ("*", "anything", True),
        ("*", "llama-*", True),
        ("llama*", "llama", True),
        ("llama*", "llama-3*", True),
        ("llama*", "*llama", False),
        ("*-instruct", "llama-*-instruct", True),
        ("llama?", "llama*", False),
        ("llama?", "llama[12]", True),
        ("llama-[0-9]", "llama-7", True),
        ("llama-[0-9]", "llama-[0-9]", True),
        ("llama-[0-9]", "llama-[0-5]", False),
        ("a*b", "a*", False),
        ("a*b*c", "aXbYc", True),
        ("a[b", "a[b", True),
        ("exact", "exact", True),
        ("exact", "exactly", False),
    ],
)
def test_glob_covers(outer: str, inner: str, covers: bool) -> None:
    assert glob_covers(outer, inner) is covers


# ---------------------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        ("500ms", 0.5), ("2s", 2.0), ("1.5s", 1.5), ("10m", 600.0), ("1h", 3600.0), ("7d", 604800.0),
        ("30", 30.0), (" 2 s ", 2.0), (".5s", 0.5), (0, 0.0), (45, 45.0), (0.25, 0.25),
    ],
)
def test_parse_duration(raw: object, seconds: float) -> None:
    assert parse_duration(raw) == pytest.approx(seconds)


@pytest.mark.parametrize("raw", ["", "soon", "2 seconds", "-1s", "1.2.3s", "10M", "1h30m", "inf", True, None,
                                 [1], -5, float("nan"), float("inf"), 10**400, "1e3s"])
def test_parse_duration_rejects(raw: object) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(raw)


@pytest.mark.parametrize(
    ("raw", "size"),
    [(1024, 1024), ("1024", 1024), ("512KiB", 524288), ("16MiB", 16777216), ("10MB", 10_000_000),
     ("1GiB", 1 << 30), ("2kb", 2000), ("1.5KiB", 1536), ("100B", 100)],
)
def test_parse_size(raw: object, size: int) -> None:
    assert parse_size(raw) == size


@pytest.mark.parametrize("raw", ["", "lots", "16 parsecs", "1.5", "0.5KB.", "-1KiB", 1.5, -1, True, None, 10**400])
def test_parse_size_rejects(raw: object) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(raw)


# ------------------------------------------------------------------------------ matching on a snapshot


def test_match_is_first_route_in_file_order(valid_dir: Path) -> None:
    snapshot = load_rules(valid_dir, env={"OLLAMA_KEY": "k"})
    assert snapshot.match("llama-3.1-8b", "chat").name == "chat"  # type: ignore[union-attr]
    assert snapshot.match("llama-3.1-8b", "embeddings").name == "embed"  # type: ignore[union-attr]
    assert snapshot.match("qwen-7b", "embeddings").name == "canary"  # type: ignore[union-attr]
    assert snapshot.match("mistral-large", "completions").name == "canary"  # type: ignore[union-attr]
    assert snapshot.match("qwen-7b-chat", "chat") is None
    assert snapshot.match("anything", "embeddings").name == "embed"  # type: ignore[union-attr]


def test_endpoints_filter(tmp_path: Path) -> None:
    rules = write(tmp_path / "rules", {"00-base.yaml": BASE, "c.yaml": """\
        routes:
          - name: chat-only
            match: {model: m, endpoints: [chat]}
            pool: p1
          - name: rest
            match: {model: m}
            pool: p1
        """})
    snapshot = load_rules(rules, env={})
    assert snapshot.match("m", "chat").name == "chat-only"  # type: ignore[union-attr]
    assert snapshot.match("m", "completions").name == "rest"  # type: ignore[union-attr]
    assert snapshot.match("m", "embeddings").name == "rest"  # type: ignore[union-attr]


def test_advertised_models(valid_dir: Path) -> None:
    snapshot = load_rules(valid_dir, env={"OLLAMA_KEY": "k"})
    assert snapshot.advertised_models() == ("qwen-7b",)
    assert snapshot.routes[1].advertised_models == ("qwen-7b",)
    assert snapshot.routes[0].advertised_models == ()


def test_advertised_models_deduplicated_in_order(tmp_path: Path) -> None:
    rules = write(tmp_path / "rules", {"00-base.yaml": BASE, "c.yaml": """\
        routes:
          - name: one
            match: {model: [zeta, alpha, "gpt-*"], endpoints: [chat]}
            pool: p1
          - name: two
            match: {model: [alpha, beta]}
            pool: p1
        """})
    assert load_rules(rules, env={}).advertised_models() == ("base-model", "zeta", "alpha", "beta")


def test_snapshot_type(valid_dir: Path) -> None:
    assert isinstance(load_rules(valid_dir, env={"OLLAMA_KEY": "k"}), Snapshot)


def test_secrets_in_rule_files_never_reach_an_error_message(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(
        "backends:\n"
        "  a: {url: 'http://admin:hunter2@127.0.0.1:8000'}\n"
        "  b: {url: 'http://127.0.0.1:8001', api_key_env: 'sk-live-4f9a8b7c6d5e4f3a2b1c'}\n"
        "pools:\n  p: {backends: [a, b]}\n"
        "routes:\n  - {name: main, match: {model: m}, pool: p}\n"
    )
    with pytest.raises(RulesError) as raised:
        load_rules(tmp_path, env={})
    text = "\n".join(raised.value.errors)
    assert "hunter2" not in text and "4f9a8b7c6d5e4f3a2b1c" not in text
    assert "http://***@127.0.0.1:8000" in text  # still says which URL, and what is wrong with it


# ------------------------------------------------------------------------------------------- balance forms


def route_with(tmp_path: Path, balance: str, backend: str = "") -> str:
    return BASE.replace("  b1: {url: \"http://127.0.0.1:8000\"}", f"  b1: {{url: \"http://127.0.0.1:8000\"{backend}}}") \
        .replace("    pool: p1", f"    pool: p1\n    balance: {balance}")


def test_balance_mappings_and_cache_tokens_load(tmp_path: Path) -> None:
    rules = write(tmp_path / "a", {"r.yaml": route_with(tmp_path, "{policy: least_cost, prefix: false}",
                                                      ", cache_tokens: 50000")})
    snapshot = load_rules(rules, env={})
    assert snapshot.routes[0].balance == Balance(policy="least_cost", prefix=False)
    assert snapshot.backends[0].cache_tokens == 50000
    rules = write(tmp_path / "b", {"r.yaml": route_with(tmp_path, "{policy: consistent_hash, by: \"header:X-Conv\"}")})
    balance = load_rules(rules, env={}).routes[0].balance
    assert balance.policy == "consistent_hash" and balance.by == Subject(by="header", header="x-conv")
    rules = write(tmp_path / "c", {"r.yaml": route_with(tmp_path, "least_conn")})
    assert load_rules(rules, env={}).routes[0].balance == Balance(policy="least_conn")


@pytest.mark.parametrize(
    ("balance", "message"),
    [
        ("{policy: consistent_hash}", "balance.by is required"),
        ("{policy: least_cost, by: api_key}", "balance.by is for consistent_hash, not least_cost"),
        ("{policy: least_conn, prefix: true}", "balance.prefix is for least_cost, not least_conn"),
        ("{policy: consistent_hash, by: \"cookie:x\"}", "balance.by must be one of 'header:NAME', 'body:user', 'api_key'"),
        ("{prefix: true}", "balance.policy is required"),
        ("{policy: least_cost, prefix: maybe}", "balance.prefix must be true or false"),
        ("{policy: least_cost, sticky: true}", "unknown key 'sticky' in balance of route 'base'"),
    ],
)
def test_bad_balance_mappings_are_refused_with_their_line(tmp_path: Path, balance: str, message: str) -> None:
    errors = load_errors(write(tmp_path, {"r.yaml": route_with(tmp_path, balance)}))
    assert len(errors) == 1 and message in errors[0] and "r.yaml:9" in errors[0], errors
