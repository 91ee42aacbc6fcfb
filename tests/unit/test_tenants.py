"""Unit tests for tenants: the `tenants:` section and `match.tenants` (every operator-facing message, keys
never shown), SPLITSTREAM_API_KEYS as the `default` tenant, key identification (`auth.identify`), route
selection by tenant, and the limit policy of `pipeline/limits.py` (claims, reservations, settlement,
x-ratelimit-* headers). Pure: YAML in tmp_path, no sockets."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from proxy.auth import identify
from proxy.config.loader import load_rules
from proxy.config.model import Tenant, TenantLimits
from proxy.errors import ClientAuthError
from proxy.observe.record import CLIENT_CLOSED, RequestRecord
from proxy.pipeline.cost import Estimate
from proxy.pipeline.limits import CUT_STREAM_BYTES_PER_TOKEN, Plan, Ticket, go_duration, reservation, tokens_used
from proxy.store.quota import Verdict
from tests.unit.test_loader import BASE, load_errors, write

SECRET = "sk-very-secret-key"


def sha(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def tenants_yaml(body: str) -> str:
    return BASE + "tenants:\n" + body


def test_tenants_load_with_keys_from_env_and_hashes(tmp_path: Path) -> None:
    rules = write(tmp_path, {"r.yaml": tenants_yaml(f"""\
  team-a:
    keys_env: TEAM_A_KEYS
    routes: ["ba*"]
    priority: high
    limits: {{requests_per_minute: 10, max_concurrent: 2}}
  team-b:
    key_hashes: ["{sha('b-key')}"]
defaults: {{tenant_limits: {{tokens_per_day: 1000}}}}
""")})
    snapshot = load_rules(rules, env={"TEAM_A_KEYS": f"{SECRET}, second-key ,", "SPLITSTREAM_API_KEYS": "d-key"})
    tenants = snapshot.tenants
    assert tenants.enabled and [t.name for t in tenants.all] == ["team-a", "team-b", "default"]
    by_name = {t.name: t for t in tenants.all}
    assert by_name["team-a"].limits == TenantLimits(requests_per_minute=10, max_concurrent=2)  # its own: no defaults
    assert by_name["team-b"].limits == TenantLimits(tokens_per_day=1000)
    assert by_name["default"].limits == TenantLimits(tokens_per_day=1000)
    assert by_name["team-a"].priority_name == "high" and by_name["team-b"].priority_name == "normal"
    assert identify(tenants, {"Authorization": f"Bearer {SECRET}"}) is by_name["team-a"]
    assert identify(tenants, {"Authorization": "Bearer second-key"}) is by_name["team-a"]
    assert identify(tenants, {"x-api-key": "b-key"}) is by_name["team-b"]
    assert identify(tenants, {"Authorization": "Bearer d-key"}) is by_name["default"]
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {SECRET}"}, {"x-api-key": ""}):
        with pytest.raises(ClientAuthError):
            identify(tenants, headers)
    assert SECRET not in repr(snapshot)  # only hashes are kept
    # route selection: team-a may use `base` (glob ba*), and the snapshot lists its model for it
    assert snapshot.match("base-model", "chat", by_name["team-a"]) is not None
    assert snapshot.advertised_models(by_name["team-a"]) == ("base-model",)


def test_no_tenants_and_no_env_keys_leave_the_api_open(tmp_path: Path) -> None:
    snapshot = load_rules(write(tmp_path, {"r.yaml": BASE}), env={})
    assert not snapshot.tenants.enabled
    assert identify(snapshot.tenants, {}) is None


def test_a_tenant_may_only_take_routes_it_may_use_and_match_tenants_routes_by_tenant(tmp_path: Path) -> None:
    rules = write(tmp_path, {"r.yaml": BASE.replace("routes:\n", """routes:
  - name: preview
    match: {model: "base-model", tenants: [inside]}
    pool: p1
""") + f"""\
tenants:
  inside: {{key_hashes: ["{sha('i')}"]}}
  outside: {{key_hashes: ["{sha('o')}"], routes: [base]}}
  previewer: {{key_hashes: ["{sha('p')}"], routes: [preview]}}
"""})
    snapshot = load_rules(rules, env={})
    inside, outside, previewer = snapshot.tenants.all
    assert snapshot.match("base-model", "chat", inside).name == "preview"
    assert snapshot.match("base-model", "chat", outside).name == "base"
    assert snapshot.match("base-model", "chat", previewer) is None  # `preview` is inside's only
    assert snapshot.match("base-model", "chat", None).name == "base"
    assert [r.name for r in snapshot.routes if r.serves(inside)] == ["preview", "base"]
    assert [r.name for r in snapshot.routes if r.serves(outside)] == ["base"]
    assert snapshot.match("other", "chat", outside) is None


def test_a_route_reachable_only_by_a_tenant_the_earlier_one_refuses_is_not_shadowed(tmp_path: Path) -> None:
    rules = write(tmp_path, {"r.yaml": BASE + f"""\
  - name: later
    match: {{model: base-model}}
    pool: p1
tenants:
  everyone: {{key_hashes: ["{sha('e')}"]}}
  late: {{key_hashes: ["{sha('l')}"], routes: [later]}}
"""})
    snapshot = load_rules(rules, env={})
    assert snapshot.match("base-model", "chat", snapshot.tenants.all[1]).name == "later"
    errors = load_errors(write(tmp_path / "plain", {"r.yaml": BASE + """\
  - name: later
    match: {model: base-model}
    pool: p1
"""}))
    assert any("route 'later' can never match" in error for error in errors)


@pytest.mark.parametrize(("body", "env", "expected"), [
    ("  t: {keys_env: MISSING}\n", {}, "r.yaml:10: tenant 't': keys_env 'MISSING' is not set"),
    ("  t: {keys_env: EMPTY}\n", {"EMPTY": " , "}, "r.yaml:10: tenant 't': keys_env 'EMPTY' is set but holds no key"),
    ("  t: {key_hashes: [abc]}\n", {}, "r.yaml:10: tenant 't': key_hashes item 1 must be 'sha256:' and 64 hex digits"),
    ("  t: {priority: urgent, key_hashes: [\"" + sha("k") + "\"]}\n", {},
     "r.yaml:10: tenant 't': priority must be one of high, normal, low, got 'urgent'"),
    ("  t: {}\n", {}, "r.yaml:10: tenant 't' has no keys: set keys_env and/or key_hashes"),
    ("  t: {key_hashes: [\"" + sha("k") + "\"], limits: {requests_per_minute: 0}}\n", {},
     "r.yaml:10: tenant 't': limits.requests_per_minute must be an integer > 0, got 0"),
    ("  t: {key_hashes: [\"" + sha("k") + "\"], limits: {rpm: 5}}\n", {},
     "r.yaml:10: unknown key 'rpm' in limits of tenant 't'"),
    ("  t: {key_hashes: [\"" + sha("k") + "\"], routes: [nothing*]}\n", {},
     "r.yaml:10: tenant 't': routes 'nothing*' matches no route"),
])
def test_broken_tenants_are_reported_with_file_and_line(tmp_path: Path, body: str, env: dict[str, str],
                                                        expected: str) -> None:
    errors = load_errors(write(tmp_path, {"r.yaml": tenants_yaml(body)}), env)
    assert any(error.endswith(expected.split(":", 1)[1]) and error.startswith(str(tmp_path)) for error in errors), errors


def test_a_key_of_two_tenants_is_refused_without_showing_it(tmp_path: Path) -> None:
    rules = write(tmp_path, {"r.yaml": tenants_yaml("  a: {keys_env: A}\n  b: {keys_env: B}\n")})
    errors = load_errors(rules, {"A": SECRET, "B": f"other, {SECRET}"})
    assert any("tenant 'b': a key is also a key of tenant 'a'" in error for error in errors), errors
    errors = load_errors(rules, {"A": "x", "B": "y", "SPLITSTREAM_API_KEYS": "y"})
    assert any("(from SPLITSTREAM_API_KEYS) is also a key of tenant 'b'" in e for e in errors), errors
    assert not any(SECRET in error for error in errors)


def test_match_tenants_must_name_defined_tenants(tmp_path: Path) -> None:
    rules = write(tmp_path, {"r.yaml": BASE + """\
  - name: preview
    match: {model: "x", tenants: [ghost]}
    pool: p1
"""})
    errors = load_errors(rules)
    assert any("tenant 'ghost' is not defined" in error for error in errors), errors


def test_a_tenant_route_does_not_shadow_the_route_after_it(tmp_path: Path) -> None:
    rules = write(tmp_path, {"r.yaml": tenants_yaml(f"  t: {{key_hashes: [\"{sha('k')}\"]}}\n").replace(
        "  - name: base\n", "  - name: first\n    match: {model: base-model, tenants: [t]}\n    pool: p1\n"
                            "  - name: base\n")})
    assert [r.name for r in load_rules(rules, env={}).routes] == ["first", "base"]


# --------------------------------------------------------------------------------------- limit policy

LIMITED = Tenant("t", limits=TenantLimits(requests_per_minute=60, tokens_per_minute=1000, tokens_per_day=50_000,
                                          max_concurrent=4))


def test_a_claim_takes_one_request_the_tokens_capped_at_each_limit_and_a_lease() -> None:
    plan = Plan(LIMITED)
    claim, names = plan.claim(5000.0, "lease-1"), plan.names
    assert names == ("requests_per_minute", "tokens_per_minute", "tokens_per_day")
    assert [(r.period, r.limit, r.cost) for r in claim.rates] == [(60, 60, 1), (60, 1000, 1000), (86400, 50000, 5000)]
    assert claim.slot is not None and (claim.slot.limit, claim.slot.lease) == (4, "lease-1")
    assert len({r.key for r in claim.rates} | {claim.slot.key}) == 4
    nothing = Plan(Tenant("u"))
    assert nothing.claim(10.0, "").rates == () and nothing.claim(10.0, "").slot is None and nothing.names == ()


def test_the_reservation_is_prompt_plus_max_tokens_or_the_usual_completion() -> None:
    assert reservation(Estimate(100.0, 40.0), 500) == 600.0
    assert reservation(Estimate(100.0, 40.0), None) == 140.0


def ticket() -> Ticket:
    return Ticket((), None, prompt_estimate=100.0, reserved=600.0, shared=False)


def record(**fields: object) -> RequestRecord:
    r = RequestRecord("id", "POST", "/v1/chat/completions", 0.0)
    for name, value in fields.items():
        setattr(r, name, value)
    return r


@pytest.mark.parametrize(("fields", "used"), [
    ({"backend": "b1", "status": 200, "prompt_tokens": 90, "completion_tokens": 7}, 97.0),  # reported usage
    ({"backend": "cache", "status": 200, "prompt_tokens": 90, "completion_tokens": 7}, 0.0),  # no runtime
    ({"status": 429}, 0.0),  # refused before a backend was chosen
    ({"backend": "b1", "status": 200, "stream": True, "bytes_out": 1600}, 100.0 + 1600 / CUT_STREAM_BYTES_PER_TOKEN),
    ({"backend": "b1", "status": CLIENT_CLOSED}, 100.0),  # left while the runtime prefilled
    ({"backend": "b1", "status": 200}, 600.0),  # answered without usage: the estimate stands
    ({"backend": "b1", "status": 502, "error": "backend_error"}, 0.0),
])
def test_what_a_request_is_charged_when_it_ends(fields: dict[str, object], used: float) -> None:
    assert tokens_used(record(**fields), ticket()) == pytest.approx(used)


def test_limit_headers_follow_openai() -> None:
    verdict = Verdict(True, -1, 0.0, remaining=(59.0, 700.0, 49_700.0), reset=(1.0, 18.0, 259.2), in_use=1)
    assert dict(Plan(LIMITED).headers(verdict)) == {
        "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "700",
        "x-ratelimit-reset-tokens": "18s",
    }
    daily = Plan(Tenant("d", limits=TenantLimits(tokens_per_day=9000)))  # the only token limit: it is shown
    verdict = Verdict(True, -1, 0.0, remaining=(8000.0,), reset=(9600.0,), in_use=0)
    assert dict(daily.headers(verdict)) == {"x-ratelimit-limit-tokens": "9000", "x-ratelimit-remaining-tokens": "8000",
                                            "x-ratelimit-reset-tokens": "2h40m0s"}


@pytest.mark.parametrize(("seconds", "text"), [
    (0.02, "20ms"), (0.0, "0ms"), (1.5, "1.5s"), (59.999, "59.999s"), (360.0, "6m0s"), (3723.0, "1h2m3s"),
])
def test_durations_are_written_as_openai_writes_them(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text


async def test_a_running_request_keeps_its_lease_past_the_lease_ttl_and_a_dead_one_loses_it() -> None:
    """Embedded store: leases live LEASE_TTL unless renewed; renewal keeps a long stream's slot taken, and a
    lease nobody renews (its replica died) runs out."""
    from proxy.observe.metrics import Metrics
    from proxy.pipeline.limits import LEASE_TTL, Limiter
    from proxy.store.quota import QuotaTable
    from tests.conftest import FakeClock

    clock = FakeClock()
    limiter = Limiter(None, Metrics(), QuotaTable(clock=clock))
    one = Tenant("t", limits=TenantLimits(max_concurrent=1))
    running = await limiter.admit(one, Estimate(1.0, 1.0), None, record())
    for _ in range(3):  # three lease lifetimes, renewed every third of one
        clock.advance(LEASE_TTL / 3)
        limiter.renew_now()
        clock.advance(LEASE_TTL / 3)
        with pytest.raises(Exception) as caught:
            await limiter.admit(one, Estimate(1.0, 1.0), None, record())
        assert "max_concurrent" in str(caught.value)
    limiter.settle(running, record(backend="b1", status=200, prompt_tokens=1, completion_tokens=1))
    after = await limiter.admit(one, Estimate(1.0, 1.0), None, record())  # released: the slot is free
    # `after` is never settled nor renewed (as if its replica died): its slot frees itself after LEASE_TTL
    assert after.slot is not None
    clock.advance(LEASE_TTL + 1)
    await limiter.admit(one, Estimate(1.0, 1.0), None, record())
