"""The TLS / AUTH / client-identity helpers of peers_tls.py work against the real programs.

No smtpguard here: these tests prove the peers themselves (Postfix with STARTTLS, Postfix with
Cyrus SASL, HAProxy sending PROXY headers, Postfix accepting PROXY and XCLIENT), so that a
failure in the smtpguard tests built on them points at smtpguard.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from peers import PeerError, Postfix, _alive, swaks
from peers_tls import (
    DEFAULT_REALM,
    Certs,
    HAProxy,
    SaslPostfix,
    SMTPClient,
    make_certs,
    proxy_postfix,
    sasl_postfix,
    tls_postfix,
    xclient_postfix,
    xtext,
)

SENDER = "sender@example.org"
CONTENT = b"Subject: peers_tls test\r\n\r\nhello\r\n"


def _ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"swaks exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    )


def _message_to(postfix: Postfix, rcpt: str) -> str:
    """Text of the one captured message for ``rcpt``."""
    found = postfix.wait_for_messages(1, where=lambda m: rcpt in m.recipients)
    assert len(found) == 1, found
    return found[0].text


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_pf(certs: Certs) -> Iterator[Postfix]:
    instance = tls_postfix(certs)
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="module")
def sasl_pf(certs: Certs) -> Iterator[SaslPostfix]:
    instance = sasl_postfix(
        {"alice": "secret", "bob": "hunter2 with spaces"}, require_auth=True, certs=certs
    )
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="module")
def proxy_pf() -> Iterator[Postfix]:
    instance = proxy_postfix()
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="module")
def plain_pf() -> Iterator[Postfix]:
    with Postfix() as instance:
        yield instance


@pytest.fixture(scope="module")
def xclient_pf() -> Iterator[Postfix]:
    # 192.0.2.99 is refused by an access table: proof that checks use the XCLIENT address.
    instance = xclient_postfix(
        extra_main_cf={
            "smtpd_client_restrictions": "check_client_access inline:{192.0.2.99=REJECT}"
        }
    )
    try:
        yield instance
    finally:
        instance.stop()


# --------------------------------------------------------------------------- certificates


def test_make_certs_writes_pem_files_for_the_test_names(certs: Certs) -> None:
    for path in (certs.ca_pem, certs.cert_pem, certs.key_pem, certs.chain_pem, certs.combined_pem):
        assert path.is_file() and path.stat().st_size > 0, path
    assert certs.key_pem.stat().st_mode & 0o077 == 0
    assert certs.combined_pem.stat().st_mode & 0o077 == 0
    assert certs.chain_pem.read_bytes().count(b"BEGIN CERTIFICATE") == 2
    combined = certs.combined_pem.read_bytes()
    assert combined.count(b"BEGIN CERTIFICATE") == 2 and b"PRIVATE KEY" in combined

    leaf = x509.load_pem_x509_certificate(certs.cert_pem.read_bytes())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = set(san.get_values_for_type(x509.DNSName))
    addresses = {str(a) for a in san.get_values_for_type(x509.IPAddress)}
    assert {"localhost", "mx.test"} <= names
    assert "127.0.0.1" in addresses
    ca = x509.load_pem_x509_certificate(certs.ca_pem.read_bytes())
    assert leaf.issuer == ca.subject


def _handshake(certs: Certs, server_hostname: str) -> str:
    """TLS over a socketpair with certs' server/client contexts; returns the TLS version."""
    left, right = socket.socketpair()
    left.settimeout(10)
    right.settimeout(10)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with certs.server_context().wrap_socket(left, server_side=True) as tls:
                tls.sendall(b"ok")
        except (OSError, ssl.SSLError) as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with certs.client_context().wrap_socket(right, server_hostname=server_hostname) as tls:
            assert tls.recv(2) == b"ok"
            return str(tls.version())
    finally:
        right.close()
        thread.join(10)
        left.close()


def test_certs_contexts_verify_the_server_names(certs: Certs) -> None:
    for name in ("localhost", "mx.test", "127.0.0.1"):
        assert _handshake(certs, name).startswith("TLS")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(certs, "other.test")


# --------------------------------------------------------------------------- STARTTLS


def test_tls_postfix_starttls_with_swaks(tls_pf: Postfix, certs: Certs) -> None:
    rcpt = "tls-swaks@example.org"
    offset = tls_pf.log_offset()
    result = swaks(
        "--server", f"{tls_pf.host}:{tls_pf.port}", "--from", SENDER, "--to", rcpt,
        "--tls", "--tls-verify", "--tls-ca-path", str(certs.ca_pem),
    )  # fmt: skip
    _ok(result)
    assert "250-STARTTLS" in result.stdout
    assert "=== TLS started with cipher" in result.stdout
    tls_pf.wait_for_log(
        r"Anonymous TLS connection established from unknown\[127\.0\.0\.1\]", offset
    )
    counters = tls_pf.wait_for_disconnect(offset)
    assert counters["starttls"] == "1" and counters["commands"] == "7", counters
    text = _message_to(tls_pf, rcpt)
    assert re.search(r"\(using TLSv1\.[23] with cipher ", text), text
    assert "with ESMTPS id" in text


def test_tls_postfix_certificate_is_checked_by_swaks(tls_pf: Postfix, tmp_path: Path) -> None:
    other = make_certs(tmp_path)  # a different CA: verification must fail
    result = swaks(
        "--server", f"{tls_pf.host}:{tls_pf.port}", "--to", "nobody@example.org",
        "--tls", "--tls-verify", "--tls-ca-path", str(other.ca_pem), "--quit-after", "TLS",
    )  # fmt: skip
    assert result.returncode != 0, result.stdout
    assert "certificate verify failed" in result.stdout + result.stderr


def test_tls_postfix_starttls_with_python_ssl(tls_pf: Postfix, certs: Certs) -> None:
    rcpt = "tls-python@example.org"
    with SMTPClient(tls_pf.host, tls_pf.port) as client:
        assert "STARTTLS" in client.ehlo().keywords
        reply = client.starttls(certs.client_context(), server_hostname="mx.test")
        assert reply.code == 220, reply
        assert isinstance(client.sock, ssl.SSLSocket)
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        assert "STARTTLS" not in client.ehlo().keywords
        replies = client.send_message(SENDER, [rcpt], CONTENT)
        assert [r.code for r in replies] == [250, 250, 354, 250], replies
        client.quit()
    assert "(using TLSv1." in _message_to(tls_pf, rcpt)

    with SMTPClient(tls_pf.host, tls_pf.port) as client:
        client.ehlo()
        with pytest.raises(ssl.SSLCertVerificationError):
            client.starttls(certs.client_context(), server_hostname="wrong.test")


# --------------------------------------------------------------------------- SASL AUTH


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_sasl_postfix_accepts_the_right_password(sasl_pf: SaslPostfix, mechanism: str) -> None:
    rcpt = f"auth-{mechanism.lower()}@example.org"
    offset = sasl_pf.log_offset()
    result = swaks(
        "--server", f"{sasl_pf.host}:{sasl_pf.port}", "--from", SENDER, "--to", rcpt,
        "--auth", mechanism, "--auth-user", "alice", "--auth-password", "secret",
    )  # fmt: skip
    _ok(result)
    assert "250-AUTH PLAIN LOGIN" in result.stdout  # exactly smtpd.conf's mech_list
    assert "235 2.7.0 Authentication successful" in result.stdout
    sasl_pf.wait_for_log(
        rf"client=unknown\[127\.0\.0\.1\]:\d+, sasl_method={mechanism}, "
        rf"sasl_username=alice@{re.escape(DEFAULT_REALM)}$",
        offset,
    )
    assert sasl_pf.wait_for_disconnect(offset)["auth"] == "1"
    text = _message_to(sasl_pf, rcpt)
    assert f"(Authenticated sender: alice@{DEFAULT_REALM})" in text
    assert "with ESMTPA id" in text


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_sasl_postfix_rejects_a_wrong_password(sasl_pf: SaslPostfix, mechanism: str) -> None:
    offset = sasl_pf.log_offset()
    result = swaks(
        "--server", f"{sasl_pf.host}:{sasl_pf.port}", "--from", SENDER,
        "--to", "never@example.org",
        "--auth", mechanism, "--auth-user", "alice", "--auth-password", "wrong",
    )  # fmt: skip
    assert result.returncode != 0, result.stdout
    assert "535 5.7.8 Error: authentication failed" in result.stdout
    sasl_pf.wait_for_log(rf"SASL {mechanism} authentication failed: authentication failure", offset)
    assert sasl_pf.wait_for_disconnect(offset)["auth"] == "0/1"


def test_sasl_postfix_requires_auth_for_relay(sasl_pf: SaslPostfix) -> None:
    offset = sasl_pf.log_offset()
    result = swaks(
        "--server", f"{sasl_pf.host}:{sasl_pf.port}", "--from", SENDER,
        "--to", "unauthenticated@example.org",
    )  # fmt: skip
    assert result.returncode != 0, result.stdout
    expected = "554 5.7.1 <unauthenticated@example.org>: Recipient address rejected: Access denied"
    assert expected in result.stdout
    assert sasl_pf.wait_for_disconnect(offset)["rcpt"] == "0/1"


def test_sasl_postfix_auth_after_starttls_and_password_with_spaces(
    sasl_pf: SaslPostfix, certs: Certs
) -> None:
    rcpt = "auth-tls@example.org"
    result = swaks(
        "--server", f"{sasl_pf.host}:{sasl_pf.port}", "--from", SENDER, "--to", rcpt,
        "--tls", "--tls-verify", "--tls-ca-path", str(certs.ca_pem),
        "--auth", "PLAIN", "--auth-user", "bob", "--auth-password", "hunter2 with spaces",
    )  # fmt: skip
    _ok(result)
    text = _message_to(sasl_pf, rcpt)
    assert f"(Authenticated sender: bob@{DEFAULT_REALM})" in text
    assert "(using TLSv1." in text and "with ESMTPSA id" in text


def test_sasl_postfix_raw_client_and_user_management(sasl_pf: SaslPostfix) -> None:
    assert sorted(sasl_pf.list_users()) == [f"alice@{DEFAULT_REALM}", f"bob@{DEFAULT_REALM}"]
    assert sasl_pf.sasldb_path.stat().st_uid != 0  # readable by smtpd after dropping root

    sasl_pf.add_user("carol", "carol-pw")
    try:
        with SMTPClient(sasl_pf.host, sasl_pf.port) as client:
            client.ehlo()
            assert client.auth_plain("carol", "nope").code == 535
            assert client.auth_plain("carol", "carol-pw").code == 235
            replies = client.send_message(SENDER, ["carol-rcpt@example.org"], CONTENT)
            assert replies[-1].code == 250, replies
            client.quit()
    finally:
        sasl_pf.delete_user("carol")
    assert f"carol@{DEFAULT_REALM}" not in sasl_pf.list_users()
    with SMTPClient(sasl_pf.host, sasl_pf.port) as client:
        client.ehlo()
        assert client.auth_plain("carol", "carol-pw").code == 535
        client.quit()


def test_sasl_postfix_with_no_users_starts_and_refuses_everyone() -> None:
    instance = sasl_postfix({}, mechanisms=("PLAIN",))
    try:
        assert instance.list_users() == []
        with SMTPClient(instance.host, instance.port) as client:
            reply = client.ehlo()
            assert any(line == "AUTH PLAIN" for line in reply.lines), reply
            assert client.auth_plain("alice", "secret").code == 535
            client.quit()
    finally:
        instance.stop()
    assert not instance.base_dir.exists()


# --------------------------------------------------------------------------- HAProxy / PROXY


def test_haproxy_check_config() -> None:
    good = HAProxy(("127.0.0.1", 25), send_proxy="v2")
    bad = HAProxy(("127.0.0.1", 25), server_options="no-such-keyword")
    try:
        result = good.check_config()
        assert result.returncode == 0, result.stdout + result.stderr
        assert "send-proxy-v2" in good.config_path.read_text()
        result = bad.check_config()
        assert result.returncode != 0
        assert "no-such-keyword" in result.stdout + result.stderr
        with pytest.raises(PeerError, match="rejected the config"):
            bad.start()
    finally:
        good.stop()
        bad.stop()
    assert not good.config_path.exists()


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_haproxy_passes_the_original_client_to_postfix(proxy_pf: Postfix, version: str) -> None:
    rcpt = f"proxy-{version}@example.org"
    offset = proxy_pf.log_offset()
    with HAProxy(proxy_pf.address, send_proxy=version) as proxy:
        assert f"{proxy.host}:{proxy.port}" != f"{proxy_pf.host}:{proxy_pf.port}"
        result = swaks(
            "--server", f"127.0.0.1:{proxy.port}", "--local-interface", "127.0.0.5",
            "--from", SENDER, "--to", rcpt,
        )  # fmt: skip
        _ok(result)
        proxy.wait_for_log(r"^127\.0\.0\.5:\d+ .* smtp_in smtp_out/upstream ")
    match = proxy_pf.wait_for_log(r"connect from (\S+)", offset)
    assert re.fullmatch(r"unknown\[127\.0\.0\.5\]:\d+", match.group(1)), match.group(0)
    assert "(unknown [127.0.0.5])" in _message_to(proxy_pf, rcpt)


def test_haproxy_raw_client_bound_to_another_loopback_address(proxy_pf: Postfix) -> None:
    offset = proxy_pf.log_offset()
    with (
        HAProxy(proxy_pf.address) as proxy,
        SMTPClient("127.0.0.1", proxy.port, source_address="127.0.0.6") as client,
    ):
        host, port = client.local_address
        assert host == "127.0.0.6"
        assert client.banner is not None and client.banner.code == 220
        client.ehlo()
        client.quit()
    proxy_pf.wait_for_log(rf"connect from unknown\[127\.0\.0\.6\]:{port}$", offset)


def test_haproxy_without_proxy_header_hides_the_client(plain_pf: Postfix) -> None:
    offset = plain_pf.log_offset()
    with HAProxy(plain_pf.address, send_proxy=None) as proxy:
        assert "send-proxy" not in proxy.config()
        result = swaks(
            "--server", f"127.0.0.1:{proxy.port}", "--local-interface", "127.0.0.5",
            "--to", "plain-haproxy@example.org", "--from", SENDER,
        )  # fmt: skip
        _ok(result)
    plain_pf.wait_for_log(r"connect from unknown\[127\.0\.0\.1\]:\d+$", offset)
    assert "127.0.0.5" not in plain_pf.log_since(offset)


def test_haproxy_start_does_not_probe_the_backend(proxy_pf: Postfix) -> None:
    offset = proxy_pf.log_offset()
    with HAProxy(proxy_pf.address):
        pass
    assert "connect from" not in proxy_pf.log_since(offset)


def test_haproxy_stop_kills_the_process_and_frees_the_port(proxy_pf: Postfix) -> None:
    proxy = HAProxy(proxy_pf.address).start()
    proc = proxy._proc
    assert proc is not None and proc.poll() is None
    base_dir, port = proxy.base_dir, proxy.port
    proxy.stop()
    assert proc.poll() is not None
    assert not base_dir.exists()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    proxy.stop()  # idempotent


def test_haproxy_left_behind_by_a_killed_test_run_is_reaped() -> None:
    script = (
        "import time\n"
        "from peers_tls import HAProxy\n"
        "proxy = HAProxy(('127.0.0.1', 9)).start()\n"
        "print(proxy.base_dir, proxy._proc.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=Path(__file__).parent,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None
        base_dir, pid = owner.stdout.readline().split()
    finally:
        owner.kill()
        owner.wait(10)
    orphan = int(pid)
    assert _alive(orphan), "haproxy should outlive its killed owner (own session)"
    try:
        HAProxy(("127.0.0.1", 9)).stop()  # nothing started: no reaping yet
        assert _alive(orphan)
        fresh = HAProxy(("127.0.0.1", 9))
        fresh.check_config()  # creating a new HAProxy folder reaps the orphans
        fresh.stop()
        assert not _alive(orphan)
        assert not Path(base_dir).exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(orphan, signal.SIGKILL)


def test_proxy_postfix_reads_a_proxy_header_sent_by_swaks(proxy_pf: Postfix) -> None:
    offset = proxy_pf.log_offset()
    result = swaks(
        "--server", f"{proxy_pf.host}:{proxy_pf.port}", "--from", SENDER,
        "--to", "swaks-proxy@example.org",
        "--proxy-version", "2", "--proxy-family", "AF_INET",
        "--proxy-source", "198.51.100.23", "--proxy-source-port", "5555",
        "--proxy-dest", "127.0.0.1", "--proxy-dest-port", "25",
    )  # fmt: skip
    _ok(result)
    proxy_pf.wait_for_log(r"connect from unknown\[198\.51\.100\.23\]:5555$", offset)


# --------------------------------------------------------------------------- XCLIENT


def test_xclient_postfix_takes_the_client_from_xclient(xclient_pf: Postfix) -> None:
    rcpt = "xclient@example.org"
    offset = xclient_pf.log_offset()
    with SMTPClient(xclient_pf.host, xclient_pf.port) as client:
        ehlo = client.ehlo()
        assert "XCLIENT" in ehlo.keywords
        xclient_line = next(line for line in ehlo.lines if line.startswith("XCLIENT"))
        assert {"ADDR", "PORT", "NAME", "HELO", "LOGIN"} <= set(xclient_line.split()[1:])
        reply = client.xclient(addr="192.0.2.7", port="4242")
        assert reply.code == 220, reply  # a fresh greeting: the session starts over
        assert "ESMTP" in reply.text
        assert client.ehlo().code == 250
        replies = client.send_message(SENDER, [rcpt], CONTENT)
        assert replies[-1].code == 250, replies
        client.quit()
    # The connect line still shows the real peer; everything after XCLIENT the new client.
    xclient_pf.wait_for_log(r"connect from unknown\[127\.0\.0\.1\]:\d+$", offset)
    xclient_pf.wait_for_log(r"\w+: client=unknown\[192\.0\.2\.7\]:4242$", offset)
    counters = xclient_pf.wait_for_disconnect(offset)
    log = xclient_pf.log_since(offset)
    assert re.search(r"disconnect from unknown\[192\.0\.2\.7\]:4242 ", log), log
    # Postfix 3.7 counts even a successful XCLIENT as failed in this line.
    assert counters["xclient"] in ("1", "0/1") and counters["ehlo"] == "2", counters
    assert "(unknown [192.0.2.7])" in _message_to(xclient_pf, rcpt)


def test_xclient_address_is_used_for_access_checks(xclient_pf: Postfix) -> None:
    offset = xclient_pf.log_offset()
    with SMTPClient(xclient_pf.host, xclient_pf.port) as client:
        client.ehlo()
        assert client.xclient(addr="192.0.2.99", port="4243", name="evil.example").code == 220
        client.ehlo()
        replies = client.send_message(SENDER, ["blocked@example.org"], CONTENT)
        assert replies[-1].code == 554, replies
        assert "Client host rejected: Access denied" in replies[-1].text
        client.quit()
    xclient_pf.wait_for_log(
        r"NOQUEUE: reject: RCPT from evil\.example\[192\.0\.2\.99\]:4243: 554 5\.7\.1", offset
    )


def test_xclient_with_swaks(xclient_pf: Postfix) -> None:
    offset = xclient_pf.log_offset()
    result = swaks(
        "--server", f"{xclient_pf.host}:{xclient_pf.port}", "--from", SENDER,
        "--to", "xclient-swaks@example.org",
        "--xclient-addr", "192.0.2.8", "--xclient-port", "4444",
    )  # fmt: skip
    _ok(result)
    assert " -> XCLIENT ADDR=192.0.2.8 PORT=4444" in result.stdout
    xclient_pf.wait_for_log(r"client=unknown\[192\.0\.2\.8\]:4444$", offset)


def test_xclient_refused_to_unauthorized_hosts(plain_pf: Postfix) -> None:
    with SMTPClient(plain_pf.host, plain_pf.port) as client:
        assert "XCLIENT" not in client.ehlo().keywords
        reply = client.xclient(addr="192.0.2.7")
        assert reply.code == 550, reply
        client.quit()


def test_xtext() -> None:
    assert xtext("192.0.2.7") == "192.0.2.7"
    assert xtext("a b+c=d") == "a+20b+2Bc+3Dd"
