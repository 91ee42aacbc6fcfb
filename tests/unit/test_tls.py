"""https:// backends without sockets: what the rules make of an https URL and its `tls:` block, the Host header
built from the authority, and `proxy.upstream.tls` (contexts as the rules say, memoised until the CA file
changes). Handshakes against real servers are in tests/integration/test_tls.py."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest
import trustme

from proxy.config.loader import RulesError, load_rules
from proxy.config.model import Backend, Tls
from proxy.pipeline.forward import build_request
from proxy.upstream.connection import endpoint_of
from proxy.upstream.tls import context_for

ROUTE = """\
pools:
  p: {backends: [b]}
routes:
  - name: r
    match: {model: m}
    pool: p
"""


def load_backend(tmp_path: Path, backend_yaml: str) -> Backend:
    (tmp_path / "rules.yaml").write_text(f"backends:\n  b: {backend_yaml}\n{ROUTE}")
    return load_rules(tmp_path, env={}).backends[0]


def load_error(tmp_path: Path, backend_yaml: str) -> str:
    (tmp_path / "rules.yaml").write_text(f"backends:\n  b: {backend_yaml}\n{ROUTE}")
    with pytest.raises(RulesError) as caught:
        load_rules(tmp_path, env={})
    assert len(caught.value.errors) == 1, caught.value.errors
    return caught.value.errors[0]


@pytest.fixture(scope="module")
def ca_pem(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


# ------------------------------------------------------------------------------------------------ rules


@pytest.mark.parametrize(("url", "port", "authority", "secure"), [
    ("https://runtime.example", 443, "runtime.example", True),
    ("https://runtime.example:443/v1", 443, "runtime.example", True),
    ("https://runtime.example:8443", 8443, "runtime.example:8443", True),
    ("https://[::1]:8443", 8443, "[::1]:8443", True),
    ("http://runtime.example", 80, "runtime.example", False),
    ("http://runtime.example:443", 443, "runtime.example:443", False),  # 443 is only https's default
])
def test_url_gives_port_authority_and_tls(tmp_path: Path, url: str, port: int, authority: str, secure: bool) -> None:
    backend = load_backend(tmp_path, f'{{url: "{url}"}}')
    assert (backend.port, backend.authority) == (port, authority)
    assert backend.tls == (Tls() if secure else None)  # https: system trust store, hostname checked


def test_tls_block_is_read(tmp_path: Path, ca_pem: Path) -> None:
    backend = load_backend(
        tmp_path, f'{{url: "https://10.0.0.5:8443", tls: {{ca_file: "{ca_pem}", server_name: vllm.internal}}}}')
    assert backend.tls == Tls(ca_file=str(ca_pem), verify=True, server_name="vllm.internal")
    assert load_backend(tmp_path, '{url: "https://h", tls: {verify: false}}').tls == Tls(verify=False)


@pytest.mark.parametrize(("backend_yaml", "message"), [
    ('{url: "http://h:1", tls: {verify: false}}', "rules.yaml:2: backend 'b': tls needs an https:// url"),
    ('{url: "https://h", tls: {ca_file: /nonexistent/ca.pem}}',
     "rules.yaml:2: backend 'b': tls.ca_file '/nonexistent/ca.pem' cannot be used: [Errno 2] No such file or directory"),
    ('{url: "https://h", tls: {verify: "no"}}', "rules.yaml:2: backend 'b': tls.verify must be true or false, got 'no'"),
    ('{url: "https://h", tls: {sni: x}}', "rules.yaml:2: unknown key 'sni' in tls of backend 'b'"),
])
def test_tls_mistakes_are_refused(tmp_path: Path, backend_yaml: str, message: str) -> None:
    assert load_error(tmp_path, backend_yaml) == f"{tmp_path}/{message}"


def test_ca_file_without_certificates_is_refused(tmp_path: Path) -> None:
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    error = load_error(tmp_path, f'{{url: "https://h", tls: {{ca_file: "{not_pem}"}}}}')
    assert error.startswith(f"{tmp_path}/rules.yaml:2: backend 'b': tls.ca_file '{not_pem}' cannot be used: ")


# --------------------------------------------------------------------------------------------- requests


def test_host_header_is_the_authority(tmp_path: Path) -> None:
    default_port = load_backend(tmp_path, '{url: "https://runtime.example/prefix"}')
    head = build_request(default_port, "/v1/chat/completions", b"{}", "rid", False).split(b"\r\n\r\n")[0]
    assert head.startswith(b"POST /prefix/v1/chat/completions HTTP/1.1\r\n")
    assert b"\r\nHost: runtime.example\r\n" in head
    by_hand = Backend(name="b", url="http://127.0.0.1:8000", host="127.0.0.1", port=8000, base_path="")
    assert b"\r\nHost: 127.0.0.1:8000\r\n" in build_request(by_hand, "/v1/models", b"", "rid", False)


def test_tls_and_plain_connections_to_one_address_never_share_a_pool_slot() -> None:
    plain = Backend(name="a", url="http://h:8443", host="h", port=8443, base_path="")
    secure = Backend(name="b", url="https://h:8443", host="h", port=8443, base_path="", tls=Tls())
    other_ca = Backend(name="c", url="https://h:8443", host="h", port=8443, base_path="", tls=Tls(ca_file="/ca.pem"))
    twin = Backend(name="d", url="https://h:8443", host="h", port=8443, base_path="", tls=Tls())
    assert len({endpoint_of(b) for b in (plain, secure, other_ca)}) == 3
    assert endpoint_of(secure) == endpoint_of(twin)  # same address, same verification: interchangeable


# ------------------------------------------------------------------------------------------------ contexts


def test_context_verifies_by_default() -> None:
    context = context_for(Tls())
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


def test_verify_false_accepts_any_certificate() -> None:
    context = context_for(Tls(verify=False))
    assert context.verify_mode == ssl.CERT_NONE and not context.check_hostname


def test_contexts_are_memoised_per_trust_setting(ca_pem: Path) -> None:
    tls = Tls(ca_file=str(ca_pem))
    assert context_for(tls) is context_for(Tls(ca_file=str(ca_pem)))
    assert context_for(tls) is context_for(Tls(ca_file=str(ca_pem), server_name="other"))  # SNI is per connection
    assert context_for(tls) is not context_for(Tls(ca_file=str(ca_pem), verify=False))
    assert context_for(tls) is not context_for(Tls())
    assert context_for(Tls()) is context_for(Tls())


def test_a_rotated_ca_file_gives_a_new_context(tmp_path: Path) -> None:
    path = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    tls = Tls(ca_file=str(path))
    before = context_for(tls)
    trustme.CA().cert_pem.write_to_path(str(path))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # a new version, whatever the clock says
    after = context_for(tls)
    assert after is not before and context_for(tls) is after
    assert after.get_ca_certs() != before.get_ca_certs()


def test_a_ca_file_gone_at_run_time_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        context_for(Tls(ca_file=str(tmp_path / "gone.pem")))
