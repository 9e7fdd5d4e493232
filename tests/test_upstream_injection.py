"""STARTTLS response injection on the upstream side: bytes after the upstream's 220.

An upstream (or a man in the middle before TLS) that sends ``220 go`` plus
more replies in one segment would have those replies answer the client's
first commands after TLS.  smtpguard discards them and counts them.
"""

from __future__ import annotations

import pathlib
import ssl

import trio
import trio.testing
import trustme
from support.driver import open_session, read_replies
from support.upstream import DEFAULT, ScriptedUpstream


def injecting_upstream(cert: trustme.LeafCert) -> ScriptedUpstream:
    """An upstream that injects a reply after its STARTTLS 220, then speaks TLS."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    return ScriptedUpstream(
        pipelining=False,
        keywords=(),  # before TLS: "250-fake", "250 STARTTLS"
        tls=context,
        replies={b"STARTTLS": b"220 go ahead"},
        after_starttls=b"250 2.0.0 INJECTED\r\n",
        tls_replies={
            b"EHLO": b"250-fake-tls\r\n250 PIPELINING",
            DEFAULT: b"250 2.0.0 ok over tls",
            b"QUIT": b"221 bye",
        },
    )


async def test_bytes_after_the_upstream_220_are_discarded(tmp_path: pathlib.Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("mx.test")
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    upstream = injecting_upstream(cert)
    async with trio.open_nursery() as nursery:
        h = await open_session(
            nursery,
            upstream,
            upstream_tls={"mode": "required", "ca_file": str(ca_file), "server_name": "mx.test"},
        )
        client, registry = h.client, h.registry
        assert await read_replies(client, 1) == [b"220 fake ESMTP\r\n"]
        await client.send_all(b"EHLO c\r\nNOOP\r\n")
        replies = await read_replies(client, 2)
        assert replies[0].startswith(b"250-fake-tls\r\n")  # the upstream's reply over TLS
        assert replies[1] == b"250 2.0.0 ok over tls\r\n"  # not the injected one
        await client.send_all(b"QUIT\r\n")
        assert (await read_replies(client, 1))[0] == b"221 bye\r\n"
    # Before TLS: smtpguard's own EHLO, then STARTTLS; over TLS: the client's session.
    assert upstream.lines[0].startswith(b"EHLO ") and upstream.lines[1] == b"STARTTLS"
    assert upstream.lines[2:] == [b"EHLO c", b"NOOP", b"QUIT"]
    assert (
        registry.get_sample_value(
            "smtpguard_policy_actions_total",
            {"defence": "starttls_injection", "action": "reject"},
        )
        == 1
    )
    assert registry.get_sample_value("smtpguard_upstream_tls_total", {"result": "established"}) == 1
