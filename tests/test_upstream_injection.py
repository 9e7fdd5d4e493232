"""STARTTLS response injection on the upstream side: bytes after the upstream's 220.

An upstream (or a man in the middle before TLS) that sends ``220 go`` plus
more replies in one segment would have those replies answer the client's
first commands after TLS.  smtpguard discards them and counts them.
"""

from __future__ import annotations

import pathlib

import trio
import trio.testing
import trustme
from prometheus_client import CollectorRegistry
from test_proxy import make_proxy, read_replies


async def tls_upstream(stream: trio.abc.Stream, cert: trustme.LeafCert, seen: list[bytes]) -> None:
    """A tiny upstream that injects a reply after its STARTTLS 220, then speaks TLS."""
    import ssl

    buf = b""

    async def line(s: trio.abc.Stream) -> bytes:
        nonlocal buf
        while b"\r\n" not in buf:
            chunk = await s.receive_some(4096)
            if not chunk:
                raise EOFError
            buf += chunk
        out, buf = buf.split(b"\r\n", 1)
        return out

    await stream.send_all(b"220 fake ESMTP\r\n")
    assert (await line(stream)).startswith(b"EHLO ")
    await stream.send_all(b"250-fake\r\n250 STARTTLS\r\n")
    assert await line(stream) == b"STARTTLS"
    await stream.send_all(b"220 go ahead\r\n250 2.0.0 INJECTED\r\n")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    tls = trio.SSLStream(stream, ctx, server_side=True)
    await tls.do_handshake()
    try:
        while True:
            command = await line(tls)
            seen.append(command)
            if command.startswith(b"EHLO"):
                await tls.send_all(b"250-fake-tls\r\n250 PIPELINING\r\n")
            elif command == b"QUIT":
                await tls.send_all(b"221 bye\r\n")
                return
            else:
                await tls.send_all(b"250 2.0.0 ok over tls\r\n")
    except (EOFError, trio.BrokenResourceError):
        pass


async def test_bytes_after_the_upstream_220_are_discarded(tmp_path: pathlib.Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("mx.test")
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    registry = CollectorRegistry()
    client, proxy_side = trio.testing.memory_stream_pair()
    up_proxy_side, up_side = trio.testing.memory_stream_pair()
    seen: list[bytes] = []
    async with trio.open_nursery() as nursery:

        async def connect() -> trio.abc.Stream:
            nursery.start_soon(tls_upstream, up_side, cert, seen)
            return up_proxy_side

        proxy = make_proxy(
            registry,
            connect,
            upstream_tls={"mode": "required", "ca_file": str(ca_file), "server_name": "mx.test"},
        )
        nursery.start_soon(proxy.handle, proxy_side)
        assert await read_replies(client, 1) == [b"220 fake ESMTP\r\n"]
        await client.send_all(b"EHLO c\r\nNOOP\r\n")
        replies = await read_replies(client, 2)
        assert replies[0].startswith(b"250-fake-tls\r\n")  # the upstream's reply over TLS
        assert replies[1] == b"250 2.0.0 ok over tls\r\n"  # not the injected one
        await client.send_all(b"QUIT\r\n")
        assert (await read_replies(client, 1))[0] == b"221 bye\r\n"
    assert seen == [b"EHLO c", b"NOOP", b"QUIT"]
    assert (
        registry.get_sample_value(
            "smtpguard_policy_actions_total",
            {"defence": "starttls_injection", "action": "reject"},
        )
        == 1
    )
    assert registry.get_sample_value("smtpguard_upstream_tls_total", {"result": "established"}) == 1
