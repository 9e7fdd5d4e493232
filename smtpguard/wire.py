"""The pumps' I/O: one interface, :class:`Wire`, over any trio stream.

The pumps, the settling and the closing in :mod:`smtpguard.proxy` call the
same three methods on every stream: :meth:`Wire.receive`, :meth:`Wire.send`
and :meth:`Wire.close`.  A plain TCP socket gets a :class:`SocketWire`,
which reads and writes its file descriptor directly; every other stream (a
TLS stream, a stream after a PROXY header, the tests' memory streams) gets
a :class:`Wire`, which calls the stream's own methods.  :func:`wire` makes
that choice once per stream: it is the only place that asks what a stream
is (an ``SSLStream``'s socket carries TLS records, so only a bare socket
may be read through its descriptor).

Why the descriptor: trio's ``SocketStream.receive_some`` and ``send_all``
wrap the same system calls in layers of coroutines and context managers.
An idle connection keeps them alive while it waits (about 2 KiB per waiting
read), and ``send_all`` yields to the scheduler after every send even when
the kernel took everything at once (the usual case for a reply or a
command).  tests/test_sockets.py drives the descriptor path over loopback.
"""

from __future__ import annotations

import contextlib
import errno
import os

import trio

#: How much one read asks for.
READ_BYTES = 65536

#: How long a TLS close may take to send its close_notify.
CLOSE_NOTIFY_SECONDS = 1.0

#: How long the last words to a client (a refusal, a 421) may take.
LAST_WORDS_SECONDS = 10

#: Reads in a row (process-wide) that may run on without letting other tasks
#: in.  Measured (one client flooding a DATA body through one process while
#: another sends NOOPs, to a fair upstream): at 16 the NOOPs waited 13 ms
#: (p50) behind the flood; at 1, 1.8 ms, close to trio's own yield after
#: every read (1.1 ms); large-message throughput was the same for all three.
EAGER_READS = 1
_eager = 0


class Wire:
    """A stream as the pumps use it (any ``trio.abc.Stream``)."""

    __slots__ = ("stream",)

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream

    async def receive(self) -> bytes | bytearray:
        """The next bytes; ``b""`` at EOF and when the stream broke.

        Raises ``trio.ClosedResourceError`` if we closed the stream ourselves.
        """
        try:
            return await self.stream.receive_some(READ_BYTES)
        except (trio.BrokenResourceError, OSError):
            return b""

    async def send(self, data: bytes) -> None:
        """Send all of ``data``.  A broken stream raises ``trio.BrokenResourceError``,
        ``trio.ClosedResourceError`` or ``OSError`` (callers catch all three)."""
        await self.stream.send_all(data)

    async def close(self) -> None:
        """``trio.aclose_forcefully``, shielded; a TLS stream first gets a
        ``close_notify`` (RFC 8446 6.1), as Postfix sends after its 221:
        without it clients log a truncation, and a TLS 1.2 session cannot be
        resumed.  Its own reply is not awaited."""
        stream = self.stream
        with trio.CancelScope(shield=True):
            if isinstance(stream, trio.SSLStream):
                with trio.move_on_after(CLOSE_NOTIFY_SECONDS):
                    await stream.aclose()
                    return
            await trio.aclose_forcefully(stream)


class SocketWire(Wire):
    """A plain TCP socket, read and written through its file descriptor."""

    __slots__ = ("_fd", "_drained")

    stream: trio.SocketStream

    def __init__(self, stream: trio.SocketStream) -> None:
        super().__init__(stream)
        self._fd = stream.socket.fileno()
        #: The last read emptied the socket (it got less than it asked for).
        self._drained = False

    async def receive(self) -> bytes | bytearray:
        """As :meth:`Wire.receive`, minus trio's layers.

        After a read that emptied the socket (as each command or reply of a
        request-response exchange does) wait for readiness first, instead
        of trying a read that fails with EAGAIN.  Otherwise try first; a
        read that finds data at once yields to the other tasks only every
        :data:`EAGER_READS` times in a row (trio's own read yields every
        time: a scheduler round per read).
        """
        global _eager
        fd = self._fd
        if not self._drained:
            await trio.lowlevel.checkpoint_if_cancelled()
            got = _read_now(fd)
            if got is not None:
                if _eager >= EAGER_READS:
                    _eager = 0
                    await trio.lowlevel.cancel_shielded_checkpoint()
                else:
                    _eager += 1
                self._drained = len(got) < READ_BYTES
                return got
        _eager = 0
        while True:
            await trio.lowlevel.wait_readable(fd)
            got = _read_now(fd)
            if got is not None:
                self._drained = len(got) < READ_BYTES
                return got

    async def send(self, data: bytes) -> None:
        """Straight to the kernel: waits (and yields) only when the socket
        buffer is full.  Errors are OSErrors."""
        fd = self._fd
        view = memoryview(data)
        while True:
            try:
                sent = os.write(fd, view)
            except BlockingIOError:
                sent = 0
            if sent == len(view):
                return
            view = view[sent:]
            await trio.lowlevel.wait_writable(fd)

    async def close(self) -> None:
        """Closed at once (no cancel scope, no checkpoint: a connection's
        last steps, run for every one)."""
        self.stream.socket.close()


def wire(stream: trio.abc.Stream) -> Wire:
    """The :class:`Wire` for ``stream``: a :class:`SocketWire` for a plain
    ``trio.SocketStream`` (not a subclass: it could change the I/O)."""
    if type(stream) is trio.SocketStream:
        return SocketWire(stream)
    return Wire(stream)


async def send_last(client: Wire, data: bytes) -> None:
    """Last words to a client that is about to be closed: bounded in time,
    and a client already gone is no error."""
    with trio.move_on_after(LAST_WORDS_SECONDS):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await client.send(data)


def _read_now(fd: int) -> bytes | None:
    """What a non-blocking socket has for us: None when nothing yet, b"" at EOF."""
    try:
        return os.read(fd, READ_BYTES)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno in (errno.EBADF, errno.ENOTSOCK):
            raise trio.ClosedResourceError("this socket was already closed") from None
        return b""  # what the pumps make of a BrokenResourceError
