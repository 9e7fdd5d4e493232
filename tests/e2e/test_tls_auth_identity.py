"""TLS, AUTH and client identity end to end: smtpguard (a real subprocess) between real peers.

- STARTTLS and implicit TLS terminated by smtpguard with trustme certificates, driven by swaks
  (verifying the certificate), smtplib and raw sockets; Postfix never sees STARTTLS, and
  plaintext injected behind STARTTLS (CVE-2011-0411) never reaches it;
- AUTH relayed to a Postfix with Cyrus SASL only once the client is encrypted, and never
  logged by smtpguard;
- the client's real address carried through HAProxy (PROXY v1/v2 in) and on to Postfix
  (PROXY v1/v2 or XCLIENT out), and listeners requiring a PROXY header turning others away.

Postfix's own log (``connect from``, ``disconnect from ... commands=``, ``sasl_username=``)
proves what reached it.
"""

from __future__ import annotations

import base64
import re
import smtplib
import socket
import ssl
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest
from guard import Guard
from peers import Postfix, free_port, swaks
from peers_tls import (
    DEFAULT_REALM,
    Certs,
    HAProxy,
    SaslPostfix,
    SMTPClient,
    make_certs,
    proxy_postfix,
    sasl_postfix,
    xclient_postfix,
)

SENDER = "sender@example.org"
POLICY = "smtpguard_policy_actions_total"
TLS_SESSIONS = "smtpguard_tls_sessions_total"
PASSWORD = "secret"
WRONG_PASSWORD = "not-the-password-4711"


def unique() -> str:
    return uuid.uuid4().hex[:12]


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class ListenerGuard(Guard):
    """A :class:`Guard` whose ``listen`` entries are mappings (tls, proxy_protocol, trusted).

    ``ports[i]`` is the port of ``listeners[i]``; :attr:`port` is the first one.
    """

    def __init__(
        self, upstream: str | None, listeners: Sequence[Mapping[str, Any]], **extra: Any
    ) -> None:
        ports = [free_port() for _ in listeners]
        listen = [
            {**spec, "address": f"127.0.0.1:{p}"} for spec, p in zip(listeners, ports, strict=True)
        ]
        super().__init__(upstream, listen=listen, **extra)
        self.ports = ports
        self.port = ports[0]


def tls_config(certs: Certs) -> dict[str, str]:
    return {"certificate": str(certs.cert_pem), "key": str(certs.key_pem)}


def wait_guard_log(guard: Guard, pattern: str, timeout: float = 10) -> re.Match[str]:
    """First match of regex ``pattern`` (MULTILINE) in smtpguard's log, waiting for it."""
    regex = re.compile(pattern, re.MULTILINE)
    deadline = time.monotonic() + timeout
    while True:
        match = regex.search(guard.log())
        if match is not None:
            return match
        if time.monotonic() > deadline:
            raise AssertionError(f"no {pattern!r} in smtpguard's log:\n{guard.log()[-4000:]}")
        time.sleep(0.05)


def guard_disconnect(guard: Guard, client: str, timeout: float = 10) -> str:
    """smtpguard's ``event=disconnect`` summary line for ``client`` ("host:port")."""
    pattern = rf"^.*event=disconnect conn=\d+ client={re.escape(client)} .*$"
    return wait_guard_log(guard, pattern, timeout).group(0)


def postfix_session(postfix: Postfix, offset: int, timeout: float = 10) -> dict[str, str]:
    """Counters of the Postfix session that connected first after ``offset`` (ours: the tests
    run one at a time, and each waits for its own replies)."""
    match = postfix.wait_for_log(r": connect from \S+\[[^\]]*\]:(\d+)$", offset, timeout)
    return postfix.wait_for_disconnect(offset, timeout, client_port=int(match.group(1)))


def message_session(postfix: Postfix, offset: int, queue_id: str) -> dict[str, str]:
    """Counters of the Postfix session that queued message ``queue_id``."""
    match = postfix.wait_for_log(rf"{queue_id}: client=\S+\[[^\]]*\]:(\d+)", offset)
    return postfix.wait_for_disconnect(offset, client_port=int(match.group(1)))


def closed_without_greeting(sock: socket.socket, timeout: float = 15) -> bytes:
    """Read until smtpguard closes ``sock``; returns what it sent (must be nothing)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass  # closed with our bytes unread: a reset is as good as a FIN here
    return data


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_guard(postfix: Postfix, certs: Certs) -> Iterator[ListenerGuard]:
    """STARTTLS on ``ports[0]``, implicit TLS on ``ports[1]``; upstream: the session Postfix."""
    with ListenerGuard(
        f"{postfix.host}:{postfix.port}",
        [{"tls": "none"}, {"tls": "implicit"}],
        tls=tls_config(certs),
    ) as guard:
        yield guard


@pytest.fixture(scope="module")
def sasl_pf() -> Iterator[SaslPostfix]:
    # AUTH is needed to relay at all: a message accepted proves the AUTH took effect.
    instance = sasl_postfix({"alice": PASSWORD}, require_auth=True)
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="module")
def auth_guard(sasl_pf: SaslPostfix, certs: Certs) -> Iterator[Guard]:
    # Debug logging: the strictest test of "no SASL payload in the logs".
    with Guard(
        f"{sasl_pf.host}:{sasl_pf.port}",
        tls=tls_config(certs),
        auth={"require_tls": True},
        log={"level": "debug"},
    ) as guard:
        yield guard


@pytest.fixture(scope="module")
def proxy_pf() -> Iterator[Postfix]:
    instance = proxy_postfix()
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="module")
def xclient_pf() -> Iterator[Postfix]:
    instance = xclient_postfix()
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="module")
def gate_guard(postfix: Postfix) -> Iterator[ListenerGuard]:
    """Listeners requiring a PROXY header: ``ports[0]`` trusts loopback, ``ports[1]`` only
    10.0.0.0/8 (so loopback clients are untrusted there).  A short accept-time bound."""
    with ListenerGuard(
        f"{postfix.host}:{postfix.port}",
        [
            {"proxy_protocol": True, "trusted": ["127.0.0.0/8"]},
            {"proxy_protocol": True, "trusted": ["10.0.0.0/8"]},
        ],
        timeouts={"connect_seconds": 2},
    ) as guard:
        yield guard


# --------------------------------------------------------------------------- STARTTLS


def test_swaks_starttls_verified_message_arrives(
    tls_guard: ListenerGuard, postfix: Postfix, certs: Certs
) -> None:
    tag = unique()
    rcpt = f"tls-swaks-{tag}@example.org"
    offset = postfix.log_offset()
    before = tls_guard.metric(TLS_SESSIONS, protocol="TLSv1.3")
    result = swaks(
        "--server", f"127.0.0.1:{tls_guard.port}", "--from", SENDER, "--to", rcpt,
        "--header", f"Subject: starttls {tag}",
        "--tls", "--tls-verify", "--tls-ca-path", str(certs.ca_pem),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250-STARTTLS" in result.stdout or "250 STARTTLS" in result.stdout
    assert "<-  220 2.0.0 Ready to start TLS" in result.stdout
    assert "=== TLS started with cipher" in result.stdout
    [captured] = postfix.wait_for_messages(1, where=lambda m: rcpt in m.recipients)
    assert captured.sender == SENDER and tag in captured.text
    counters = message_session(postfix, offset, captured.queue_id)
    # Postfix never saw STARTTLS, nor the EHLO after it (answered by smtpguard
    # from Postfix's own EHLO reply: an upstream may refuse a second one).
    assert "starttls" not in counters, counters
    assert counters == {
        "ehlo": "1",
        "mail": "1",
        "rcpt": "1",
        "data": "1",
        "quit": "1",
        "commands": "5",
    }, counters
    assert tls_guard.metric(TLS_SESSIONS, protocol="TLSv1.3") == before + 1


def test_smtplib_starttls_message_arrives_and_mail_before_new_ehlo_is_refused(
    tls_guard: ListenerGuard, postfix: Postfix, certs: Certs
) -> None:
    tag = unique()
    rcpt = f"tls-smtplib-{tag}@example.org"
    offset = postfix.log_offset()
    before = {v: tls_guard.metric(TLS_SESSIONS, protocol=v) for v in ("TLSv1.2", "TLSv1.3")}
    with smtplib.SMTP("127.0.0.1", tls_guard.port, timeout=30) as client:
        client.ehlo("client.example")
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")  # the session Postfix offers no AUTH anyway
        code, text = client.starttls(context=certs.client_context())
        assert (code, text) == (220, b"2.0.0 Ready to start TLS")
        assert isinstance(client.sock, ssl.SSLSocket)
        version = client.sock.version()
        assert version in ("TLSv1.2", "TLSv1.3")
        client_addr = "{}:{}".format(*client.sock.getsockname()[:2])
        # RFC 3207 4.2: after TLS the client must say EHLO again.
        code, text = client.docmd("MAIL", f"FROM:<{SENDER}>")
        assert (code, text) == (503, b"Error: send HELO/EHLO first")
        code, text = client.docmd("STARTTLS")
        assert code == 554, text  # TLS is already active (whatever the phase)
        client.ehlo("client.example")
        assert not client.has_extn("starttls")
        refused = client.sendmail(SENDER, [rcpt], f"Subject: smtplib {tag}\r\n\r\nhi\r\n")
        assert refused == {}
    [captured] = postfix.wait_for_messages(1, where=lambda m: rcpt in m.recipients)
    counters = message_session(postfix, offset, captured.queue_id)
    # The refused MAIL and both STARTTLS never reached Postfix.
    assert counters["mail"] == "1" and counters["ehlo"] == "1", counters
    assert "starttls" not in counters, counters
    line = guard_disconnect(tls_guard, client_addr)
    assert f"tls_protocol={version}" in line, line
    assert re.search(r" tls_cipher=[A-Z0-9_-]+ ", line), line
    assert " reason=quit " in line, line
    assert " violations=1 " in line, line  # the early MAIL
    assert tls_guard.metric(TLS_SESSIONS, protocol=str(version)) == before[str(version)] + 1


def test_summary_line_keeps_tls_protocol_when_the_client_just_closes(
    tls_guard: ListenerGuard, certs: Certs
) -> None:
    """Most clients close the socket without a TLS close_notify (Python's ssl, after QUIT):
    the session's TLS protocol must still be in its summary line."""
    with SMTPClient("127.0.0.1", tls_guard.port) as client:
        client.ehlo()
        assert client.starttls(certs.client_context(), server_hostname="localhost").code == 220
        assert client.ehlo().code == 250
        assert isinstance(client.sock, ssl.SSLSocket)
        version = client.sock.version()
        client_addr = "{}:{}".format(*client.local_address)
    line = guard_disconnect(tls_guard, client_addr)
    assert " reason=client_closed " in line, line
    assert f" tls_protocol={version} " in line, line


def test_starttls_tls_already_active_text(tls_guard: ListenerGuard, certs: Certs) -> None:
    with SMTPClient("127.0.0.1", tls_guard.port) as client:
        assert "STARTTLS" in client.ehlo().keywords
        assert client.starttls(certs.client_context(), server_hostname="mx.test").code == 220
        reply = client.ehlo()
        assert reply.code == 250 and "STARTTLS" not in reply.keywords
        reply = client.command("STARTTLS")
        assert str(reply) == "554 5.5.1 Error: TLS already active"
        client.quit()


@pytest.mark.parametrize(
    ("injected", "absent"),
    [
        (b"RSET\r\n", "rset"),
        (b"MAIL FROM:<injected@example.org>\r\n", "mail"),
        (b"AUTH PLAIN " + base64.b64encode(b"\0alice\0secret") + b"\r\n", "auth"),
    ],
    ids=["rset", "mail", "auth"],
)
def test_plaintext_injected_after_starttls_never_arrives(
    tls_guard: ListenerGuard, postfix: Postfix, certs: Certs, injected: bytes, absent: str
) -> None:
    offset = postfix.log_offset()
    before = tls_guard.metric(POLICY, defence="starttls_injection", action="reject")
    with SMTPClient("127.0.0.1", tls_guard.port) as client:
        client.ehlo()
        client.send_raw(b"STARTTLS\r\n" + injected)  # one write, one TCP segment
        reply = client.read_reply()
        assert reply.code == 220, reply
        client.sock = certs.client_context().wrap_socket(client.sock, server_hostname="localhost")
        reply = client.ehlo()  # the next reply is this EHLO's: nothing injected was answered
        assert reply.code == 250 and "STARTTLS" not in reply.keywords, reply
        reply = client.command("NOOP")
        assert reply.code == 250, reply
        client.quit()
    counters = postfix_session(postfix, offset)
    assert absent not in counters, counters
    assert counters == {"ehlo": "1", "noop": "1", "quit": "1", "commands": "3"}, counters
    after = tls_guard.metric(POLICY, defence="starttls_injection", action="reject")
    assert after == before + 1
    wait_guard_log(tls_guard, r"event=policy .*defence=starttls_injection action=reject")


# --------------------------------------------------------------------------- implicit TLS


def test_implicit_tls_listener(tls_guard: ListenerGuard, postfix: Postfix, certs: Certs) -> None:
    tag = unique()
    rcpt = f"implicit-{tag}@example.org"
    implicit = tls_guard.ports[1]
    before = {v: tls_guard.metric(TLS_SESSIONS, protocol=v) for v in ("TLSv1.2", "TLSv1.3")}
    with smtplib.SMTP_SSL(
        "127.0.0.1", implicit, context=certs.client_context(), timeout=30
    ) as client:
        assert isinstance(client.sock, ssl.SSLSocket)
        version = str(client.sock.version())
        client_addr = "{}:{}".format(*client.sock.getsockname()[:2])
        client.ehlo("client.example")
        assert not client.has_extn("starttls")  # already encrypted
        code, text = client.docmd("STARTTLS")
        assert (code, text) == (554, b"5.5.1 Error: TLS already active")
        refused = client.sendmail(SENDER, [rcpt], f"Subject: implicit {tag}\r\n\r\nhi\r\n")
        assert refused == {}
    [captured] = postfix.wait_for_messages(1, where=lambda m: rcpt in m.recipients)
    assert tag in captured.text
    line = guard_disconnect(tls_guard, client_addr)
    assert f"tls_protocol={version}" in line, line
    # The metric counts "client sessions that negotiated TLS (STARTTLS or implicit)".
    assert tls_guard.metric(TLS_SESSIONS, protocol=version) == before[version] + 1


def test_implicit_tls_listener_refuses_plaintext(tls_guard: ListenerGuard) -> None:
    with socket.create_connection(("127.0.0.1", tls_guard.ports[1]), timeout=15) as sock:
        sock.sendall(b"EHLO plaintext.example\r\n")
        assert closed_without_greeting(sock) == b""


# --------------------------------------------------------------------------- AUTH


def test_auth_refused_on_plaintext_and_never_reaches_postfix(
    auth_guard: Guard, sasl_pf: SaslPostfix
) -> None:
    offset = sasl_pf.log_offset()
    with SMTPClient("127.0.0.1", auth_guard.port) as client:
        ehlo = client.ehlo()
        assert "STARTTLS" in ehlo.keywords
        assert not any(k.startswith("AUTH") for k in ehlo.keywords), ehlo
        reply = client.auth_plain("alice", PASSWORD)
        assert str(reply) == (
            "538 5.7.11 Encryption required for requested authentication mechanism"
        )
        assert client.command("AUTH LOGIN").code == 538
        client.quit()
    counters = postfix_session(sasl_pf, offset)
    assert "auth" not in counters, counters
    assert counters == {"ehlo": "1", "quit": "1", "commands": "2"}, counters
    assert "sasl_" not in sasl_pf.log_since(offset)


def _tls_client(guard: Guard, certs: Certs) -> SMTPClient:
    client = SMTPClient("127.0.0.1", guard.port)
    client.ehlo()
    assert client.starttls(certs.client_context(), server_hostname="localhost").code == 220
    ehlo = client.ehlo()
    assert "AUTH" in ehlo.keywords, ehlo
    auth_line = next(line for line in ehlo.lines if line.upper().startswith("AUTH "))
    assert {"PLAIN", "LOGIN"} <= set(auth_line.upper().split()[1:]), auth_line
    return client


def test_auth_plain_after_starttls(auth_guard: Guard, sasl_pf: SaslPostfix, certs: Certs) -> None:
    rcpt = f"auth-plain-{unique()}@example.org"
    offset = sasl_pf.log_offset()
    before = auth_guard.metric("smtpguard_auth_results_total", result="success")
    with _tls_client(auth_guard, certs) as client:
        reply = client.auth_plain("alice", PASSWORD)
        assert reply.code == 235, reply
        # Authenticated once: a second AUTH is refused locally, Postfix never sees it.
        reply = client.auth_plain("alice", PASSWORD)
        assert str(reply) == "503 5.5.1 Error: already authenticated"
        assert client.command("MAIL FROM:<" + SENDER + ">").code == 250
        # AUTH inside a transaction: refused locally too.
        reply = client.command("AUTH LOGIN")
        assert str(reply) == "503 5.5.1 Error: MAIL transaction in progress"
        assert client.command(f"RCPT TO:<{rcpt}>").code == 250  # relaying needs the AUTH
        assert client.command("DATA").code == 354
        client.send_raw(b"Subject: auth plain\r\n\r\nhi\r\n.\r\n")
        assert client.read_reply().code == 250
        client.quit()
    sasl_pf.wait_for_log(
        rf"client=\S+, sasl_method=PLAIN, sasl_username=alice@{re.escape(DEFAULT_REALM)}$",
        offset,
    )
    counters = postfix_session(sasl_pf, offset)
    assert counters["auth"] == "1", counters  # exactly one AUTH reached Postfix
    assert counters["mail"] == "1" and counters["rcpt"] == "1", counters
    [captured] = sasl_pf.wait_for_messages(1, where=lambda m: rcpt in m.recipients)
    assert f"(Authenticated sender: alice@{DEFAULT_REALM})" in captured.text
    assert auth_guard.metric("smtpguard_auth_results_total", result="success") == before + 1


def _send_and_check_sasl(
    client: SMTPClient, sasl_pf: SaslPostfix, offset: int, mechanism: str
) -> None:
    """Relay a message (allowed only once authenticated); Postfix names the SASL user on the
    message's ``client=`` line."""
    rcpt = f"auth-{mechanism.lower()}-{unique()}@example.org"
    replies = client.send_message(SENDER, [rcpt], b"Subject: sasl\r\n\r\nhi\r\n")
    assert [r.code for r in replies] == [250, 250, 354, 250], replies
    client.quit()
    sasl_pf.wait_for_log(
        rf": client=\S+, sasl_method={mechanism}, "
        rf"sasl_username=alice@{re.escape(DEFAULT_REALM)}$",
        offset,
    )
    sasl_pf.wait_for_messages(1, where=lambda m: rcpt in m.recipients)


def test_auth_plain_without_initial_response(
    auth_guard: Guard, sasl_pf: SaslPostfix, certs: Certs
) -> None:
    offset = sasl_pf.log_offset()
    with _tls_client(auth_guard, certs) as client:
        reply = client.command("AUTH PLAIN")
        assert (reply.code, reply.text) == (334, ""), reply
        reply = client.command(b64(f"\0alice\0{PASSWORD}"))
        assert reply.code == 235, reply
        _send_and_check_sasl(client, sasl_pf, offset, "PLAIN")
    assert postfix_session(sasl_pf, offset)["auth"] == "1"


def test_auth_login(auth_guard: Guard, sasl_pf: SaslPostfix, certs: Certs) -> None:
    offset = sasl_pf.log_offset()
    with _tls_client(auth_guard, certs) as client:
        reply = client.command("AUTH LOGIN")
        assert (reply.code, reply.text) == (334, "VXNlcm5hbWU6"), reply  # "Username:"
        reply = client.command(b64("alice"))
        assert (reply.code, reply.text) == (334, "UGFzc3dvcmQ6"), reply  # "Password:"
        reply = client.command(b64(PASSWORD))
        assert reply.code == 235, reply
        reply = client.command("AUTH LOGIN")
        assert str(reply) == "503 5.5.1 Error: already authenticated"
        _send_and_check_sasl(client, sasl_pf, offset, "LOGIN")
    assert postfix_session(sasl_pf, offset)["auth"] == "1"


def test_auth_wrong_password_and_cancelled_exchange(
    auth_guard: Guard, sasl_pf: SaslPostfix, certs: Certs
) -> None:
    offset = sasl_pf.log_offset()
    before = auth_guard.metric("smtpguard_auth_results_total", result="failure")
    with _tls_client(auth_guard, certs) as client:
        reply = client.auth_plain("alice", WRONG_PASSWORD)
        assert reply.code == 535, reply
        reply = client.command("AUTH LOGIN")
        assert reply.code == 334
        assert client.command(b64("alice")).code == 334
        assert client.command(b64(WRONG_PASSWORD)).code == 535
        # A client may cancel an exchange with "*" (RFC 4954 4): back to commands.
        assert client.command("AUTH LOGIN").code == 334
        reply = client.command("*")
        assert reply.code == 501, reply
        # Not authenticated: Postfix refuses to relay.
        assert client.command(f"MAIL FROM:<{SENDER}>").code == 250
        assert client.command("RCPT TO:<nobody@example.org>").code == 554
        client.quit()
    counters = postfix_session(sasl_pf, offset)
    assert counters["auth"] == "0/3", counters
    log = sasl_pf.log_since(offset)
    assert "SASL PLAIN authentication failed" in log and "SASL LOGIN authentication failed" in log
    assert not re.search(r": client=\S+, sasl_method=", log), log  # nothing authenticated
    assert auth_guard.metric("smtpguard_auth_results_total", result="failure") == before + 3


def test_auth_secrets_never_in_smtpguard_logs(
    auth_guard: Guard, sasl_pf: SaslPostfix, certs: Certs
) -> None:
    # Run after the other AUTH tests of this module (file order): their secrets are in play.
    with _tls_client(auth_guard, certs) as client:
        assert client.auth_plain("alice", PASSWORD).code == 235
        client.quit()
    wait_guard_log(auth_guard, r"event=disconnect .*auth=1 ")
    log = auth_guard.log()
    assert "event=disconnect" in log and "level=debug" in log  # the capture is real
    secrets = [
        PASSWORD,
        WRONG_PASSWORD,
        b64(f"\0alice\0{PASSWORD}"),
        b64(f"\0alice\0{WRONG_PASSWORD}"),
        b64(PASSWORD),
        b64(WRONG_PASSWORD),
        b64("alice"),
        "AUTH PLAIN",
        "AUTH LOGIN",
    ]
    for secret in secrets:
        assert secret not in log, f"{secret!r} in smtpguard's log"
    assert "Traceback" not in log


# --------------------------------------------------------------------------- client identity


@pytest.mark.parametrize(
    ("send_proxy", "identity"),
    [("v2", "proxy_v2"), ("v1", "proxy_v1")],
)
def test_proxy_header_in_and_out_carries_the_client_address(
    proxy_pf: Postfix, send_proxy: str, identity: str
) -> None:
    rcpt = f"identity-{identity}-{unique()}@example.org"
    with (
        ListenerGuard(
            f"{proxy_pf.host}:{proxy_pf.port}",
            [{"proxy_protocol": True, "trusted": ["127.0.0.0/8"]}],
            upstream_identity=identity,
        ) as guard,
        HAProxy(("127.0.0.1", guard.port), send_proxy=send_proxy) as haproxy,
    ):
        offset = proxy_pf.log_offset()
        with SMTPClient("127.0.0.1", haproxy.port, source_address="127.0.0.5", timeout=5) as client:
            host, port = client.local_address
            assert host == "127.0.0.5"
            assert client.banner is not None and client.banner.code == 220, client.banner
            assert client.ehlo().code == 250
            replies = client.send_message(SENDER, [rcpt], b"Subject: identity\r\n\r\nhi\r\n")
            assert replies[-1].code == 250, replies
            client.quit()
        line = guard_disconnect(guard, f"127.0.0.5:{port}")
        assert " reason=quit " in line, line
        assert "client=127.0.0.1:" not in guard.log()
    proxy_pf.wait_for_log(rf": connect from \S+\[127\.0\.0\.5\]:{port}$", offset)
    assert "[127.0.0.1]" not in proxy_pf.log_since(offset)
    counters = proxy_pf.wait_for_disconnect(offset, client_port=port)
    assert counters["mail"] == "1" and counters["data"] == "1", counters
    [captured] = proxy_pf.wait_for_messages(1, where=lambda m: rcpt in m.recipients)
    assert "(unknown [127.0.0.5])" in captured.text


def test_xclient_carries_the_client_address(xclient_pf: Postfix) -> None:
    rcpt = f"identity-xclient-{unique()}@example.org"
    with (
        ListenerGuard(
            f"{xclient_pf.host}:{xclient_pf.port}",
            [{"proxy_protocol": True}],  # trusted defaults to loopback
            upstream_identity="xclient",
        ) as guard,
        HAProxy(("127.0.0.1", guard.port), send_proxy="v2") as haproxy,
    ):
        offset = xclient_pf.log_offset()
        with SMTPClient("127.0.0.1", haproxy.port, source_address="127.0.0.5", timeout=5) as client:
            port = client.local_address[1]
            assert client.banner is not None and client.banner.code == 220, client.banner
            ehlo = client.ehlo()
            assert ehlo.code == 250 and "XCLIENT" not in ehlo.keywords, ehlo
            replies = client.send_message(SENDER, [rcpt], b"Subject: xclient\r\n\r\nhi\r\n")
            assert replies[-1].code == 250, replies
            client.quit()
        guard_disconnect(guard, f"127.0.0.5:{port}")
    # The connect line shows smtpguard (the real TCP peer); everything after XCLIENT the client.
    xclient_pf.wait_for_log(r": connect from \S+\[127\.0\.0\.1\]:\d+$", offset)
    xclient_pf.wait_for_log(rf": client=\S+\[127\.0\.0\.5\]:{port}$", offset)
    counters = xclient_pf.wait_for_disconnect(offset, client_port=port)
    assert counters["ehlo"] == "1" and counters["mail"] == "1", counters
    assert re.search(rf"disconnect from \S+\[127\.0\.0\.5\]:{port} ", xclient_pf.log_since(offset))
    [captured] = xclient_pf.wait_for_messages(1, where=lambda m: rcpt in m.recipients)
    assert "(unknown [127.0.0.5])" in captured.text


def test_direct_client_identity_without_a_balancer(xclient_pf: Postfix) -> None:
    """No PROXY header in: the TCP peer (a client bound to 127.0.0.6) is what XCLIENT says."""
    with Guard(f"{xclient_pf.host}:{xclient_pf.port}", upstream_identity="xclient") as guard:
        offset = xclient_pf.log_offset()
        with SMTPClient("127.0.0.1", guard.port, source_address="127.0.0.6", timeout=5) as client:
            port = client.local_address[1]
            assert client.ehlo().code == 250
            client.quit()
        guard_disconnect(guard, f"127.0.0.6:{port}")
    xclient_pf.wait_for_log(rf"disconnect from \S+\[127\.0\.0\.6\]:{port} ", offset)


def test_listener_requiring_proxy_refuses_a_plain_client_that_waits(
    gate_guard: ListenerGuard, postfix: Postfix
) -> None:
    """A plain SMTP client sends nothing and waits for a greeting: it never gets one."""
    offset = postfix.log_offset()
    before = gate_guard.metric(POLICY, defence="proxy_protocol", action="reject")
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", gate_guard.ports[0]), timeout=15) as sock:
        assert closed_without_greeting(sock) == b""
    assert time.monotonic() - started < 10
    wait_guard_log(gate_guard, r"event=\"refused at accept\"|event=refused")
    assert "connect from" not in postfix.log_since(offset)
    # policy.py: the defence covers a listener that "got none, a bad one, or one from an
    # untrusted address".
    after = gate_guard.metric(POLICY, defence="proxy_protocol", action="reject")
    assert after == before + 1


def test_listener_requiring_proxy_refuses_smtp_without_header(
    gate_guard: ListenerGuard, postfix: Postfix
) -> None:
    offset = postfix.log_offset()
    before = gate_guard.metric(POLICY, defence="proxy_protocol", action="reject")
    with socket.create_connection(("127.0.0.1", gate_guard.ports[0]), timeout=15) as sock:
        sock.sendall(b"EHLO no-header.example\r\n")
        assert closed_without_greeting(sock) == b""
    after = gate_guard.metric(POLICY, defence="proxy_protocol", action="reject")
    assert after == before + 1
    assert "connect from" not in postfix.log_since(offset)


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY TCP4 198.51.100.7 127.0.0.1 5555 25\r\n",
        # PROXY v2, PROXY command, TCP over IPv4, 198.51.100.7:5555 -> 127.0.0.1:25
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c"
        + socket.inet_aton("198.51.100.7")
        + socket.inet_aton("127.0.0.1")
        + (5555).to_bytes(2, "big")
        + (25).to_bytes(2, "big"),
    ],
    ids=["v1", "v2"],
)
def test_listener_refuses_proxy_header_from_untrusted_address(
    gate_guard: ListenerGuard, postfix: Postfix, header: bytes
) -> None:
    offset = postfix.log_offset()
    before = gate_guard.metric(POLICY, defence="proxy_protocol", action="reject")
    with socket.create_connection(("127.0.0.1", gate_guard.ports[1]), timeout=15) as sock:
        sock.sendall(header + b"EHLO spoofed.example\r\n")
        assert closed_without_greeting(sock) == b""
    after = gate_guard.metric(POLICY, defence="proxy_protocol", action="reject")
    assert after == before + 1
    assert "client=198.51.100.7" not in gate_guard.log()  # the header was never believed
    assert "connect from" not in postfix.log_since(offset)


def test_listener_with_trusted_proxy_header_serves_the_client(
    gate_guard: ListenerGuard, postfix: Postfix
) -> None:
    """Control for the refusals above: the same listener with a good header works."""
    offset = postfix.log_offset()
    with SMTPClient("127.0.0.1", gate_guard.ports[0], read_banner=False) as client:
        client.send_raw(b"PROXY TCP4 192.0.2.1 127.0.0.1 5555 25\r\n")
        banner = client.read_reply()
        assert banner.code == 220, banner
        assert client.ehlo().code == 250
        client.quit()
    line = guard_disconnect(gate_guard, "192.0.2.1:5555")
    assert " reason=quit " in line, line
    counters = postfix_session(postfix, offset)
    assert counters == {"ehlo": "1", "quit": "1", "commands": "2"}, counters
