"""STARTTLS from smtpguard to a real Postfix: opportunistic, required and verified."""

from __future__ import annotations

import pathlib
import uuid
from collections.abc import Iterator

import pytest
from guard import Guard, RawClient
from peers import Postfix
from peers_tls import Certs, make_certs, tls_postfix


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("upstream-certs"))


@pytest.fixture(scope="module")
def tls_upstream(certs: Certs) -> Iterator[Postfix]:
    postfix = tls_postfix(certs)
    try:
        yield postfix
    finally:
        postfix.stop()


def send_one(port: int, tag: str) -> list[bytes]:
    with RawClient(port) as client:
        greeting = client.reply()
        client.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
        replies = [greeting, *client.replies(4)]
        if replies[-1].startswith(b"354"):
            client.send(f"Subject: {tag}\r\n\r\nover TLS\r\n.\r\nQUIT\r\n".encode())
            replies += client.replies(2)
        return replies


def test_required_verified_tls_to_the_upstream(tls_upstream: Postfix, certs: Certs) -> None:
    tag = uuid.uuid4().hex[:10]
    upstream_tls = {"mode": "required", "ca_file": str(certs.ca_pem), "server_name": "mx.test"}
    with Guard(f"{tls_upstream.host}:{tls_upstream.port}", upstream_tls=upstream_tls) as guard:
        offset = tls_upstream.log_offset()
        replies = send_one(guard.port, tag)
        assert replies[0].startswith(b"220 ")  # the upstream's own greeting
        assert replies[-2].startswith(b"250") and replies[-1].startswith(b"221")
        [message] = tls_upstream.wait_for_messages(1, where=lambda m: tag in m.text)
        assert "using TLSv1." in message.text  # Postfix's Received header: the hop was TLS
        tls_upstream.wait_for_log(r"TLS connection established from", offset)
        assert guard.metric("smtpguard_upstream_tls_total", result="established") == 1


def test_required_tls_refuses_a_certificate_for_another_name(
    tls_upstream: Postfix, certs: Certs
) -> None:
    upstream_tls = {"mode": "required", "ca_file": str(certs.ca_pem), "server_name": "wrong.test"}
    with Guard(f"{tls_upstream.host}:{tls_upstream.port}", upstream_tls=upstream_tls) as guard:
        with RawClient(guard.port) as client:
            assert client.read_to_eof().startswith(b"421 4.3.0 ")
        assert guard.metric("smtpguard_upstream_tls_total", result="failed") == 1
        assert "upstream setup failed" in guard.log()


def test_required_tls_to_an_upstream_without_starttls(postfix: Postfix) -> None:
    with Guard(f"{postfix.host}:{postfix.port}", upstream_tls={"mode": "required"}) as guard:
        with RawClient(guard.port) as client:
            assert client.read_to_eof().startswith(b"421 4.3.0 ")
        assert guard.metric("smtpguard_upstream_tls_total", result="failed") == 1


def test_opportunistic_tls_falls_back_to_plaintext(postfix: Postfix) -> None:
    tag = uuid.uuid4().hex[:10]
    with Guard(f"{postfix.host}:{postfix.port}", upstream_tls={"mode": "opportunistic"}) as guard:
        replies = send_one(guard.port, tag)
        assert replies[-1].startswith(b"221")
        [message] = postfix.wait_for_messages(1, where=lambda m: tag in m.text)
        assert "using TLS" not in message.text
        assert guard.metric("smtpguard_upstream_tls_total", result="plaintext") == 1


def test_opportunistic_tls_does_not_verify(tls_upstream: Postfix) -> None:
    tag = uuid.uuid4().hex[:10]
    port = f"{tls_upstream.host}:{tls_upstream.port}"
    with Guard(port, upstream_tls={"mode": "opportunistic"}) as guard:
        assert send_one(guard.port, tag)[-1].startswith(b"221")
        [message] = tls_upstream.wait_for_messages(1, where=lambda m: tag in m.text)
        assert "using TLSv1." in message.text
        assert guard.metric("smtpguard_upstream_tls_total", result="established") == 1


def test_config_refuses_a_missing_ca_file(tmp_path: pathlib.Path) -> None:
    from smtpguard.config import ConfigError, load

    with pytest.raises(ConfigError) as info:
        load({"upstream_tls": {"mode": "required", "ca_file": str(tmp_path / "none.pem")}})
    assert info.value.key == "upstream_tls.ca_file"
