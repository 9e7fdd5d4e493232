"""The pumps' I/O (smtpguard/wire.py): a plain socket and any other stream
behave the same through :class:`Wire`: bytes both ways, ``b""`` at EOF and
from a broken peer, and a close that is no error twice."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from smtpguard.wire import READ_BYTES, SocketWire, Wire, send_last, wire


async def socket_pair() -> tuple[trio.abc.Stream, trio.abc.Stream]:
    a, b = socket.socketpair()
    return (
        trio.SocketStream(trio.socket.from_stdlib_socket(a)),
        trio.SocketStream(trio.socket.from_stdlib_socket(b)),
    )


async def memory_pair() -> tuple[trio.abc.Stream, trio.abc.Stream]:
    return trio.testing.memory_stream_pair()


@pytest.fixture(params=[socket_pair, memory_pair], ids=["socket", "memory"])
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Wire, trio.abc.Stream]]:
    ours, theirs = await request.param()
    yield wire(ours), theirs
    await trio.aclose_forcefully(theirs)


async def test_the_choice_is_made_by_the_stream() -> None:
    sock, _ = await socket_pair()
    assert type(wire(sock)) is SocketWire
    mem, _ = await memory_pair()
    assert type(wire(mem)) is Wire


async def test_bytes_both_ways_then_eof(pair: tuple[Wire, trio.abc.Stream]) -> None:
    w, peer = pair
    await w.send(b"220 ready\r\n")
    assert await peer.receive_some(100) == b"220 ready\r\n"
    await peer.send_all(b"EHLO c\r\n")
    assert await w.receive() == b"EHLO c\r\n"
    await peer.send_all(b"NOOP\r\n")
    assert await w.receive() == b"NOOP\r\n"  # after a read that emptied the socket
    await peer.aclose()
    assert await w.receive() == b""
    await w.close()
    await w.close()  # twice: no error


async def test_a_large_send_waits_for_room(pair: tuple[Wire, trio.abc.Stream]) -> None:
    w, peer = pair
    data = bytes(range(256)) * (4 * READ_BYTES // 256)
    got = bytearray()

    async def read_all() -> None:
        while len(got) < len(data):
            got.extend(await peer.receive_some(READ_BYTES))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all)
        await w.send(data)
    assert bytes(got) == data


async def test_last_words_to_a_client_already_gone(pair: tuple[Wire, trio.abc.Stream]) -> None:
    w, peer = pair
    await peer.aclose()
    with trio.fail_after(5):
        for _ in range(3):  # a socket may take the first send before it knows
            await send_last(w, b"421 4.3.2 bye\r\n" * 1000)
