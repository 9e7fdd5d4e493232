"""A :class:`~support.upstream.ScriptedUpstream` on a real socket, one record per connection.

For end-to-end tests where smtpguard runs as a subprocess and needs an upstream
of our own that records every line it receives.  Each accepted connection gets
a fresh ``ScriptedUpstream`` built from the same settings and is served by its
sans-I/O :meth:`~support.upstream.ScriptedUpstream.conversation` in a thread of
its own (standard library sockets, no trio), so a test reads, per connection,
exactly the lines that arrived (``lines``), the raw bytes (``received``) and
the bodies::

    with RecordingUpstream(keywords=(b"SIZE 1000", b"8BITMIME")) as upstream:
        ...point smtpguard at upstream.address...
        [session] = upstream.wait_closed(1)
        assert session.lines == [b"EHLO c.example", b"QUIT"]
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any

from support.upstream import ScriptedUpstream


class RecordingUpstream:
    """Serves ``ScriptedUpstream(**settings)`` on ``127.0.0.1`` (a free port)."""

    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._sessions: list[ScriptedUpstream] = []
        self._closed: list[bool] = []
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._clients: set[socket.socket] = set()
        self._stopping = threading.Event()
        self.port = 0

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def upstream(self) -> str:
        """``host:port``, as smtpguard's ``upstream`` key wants it."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> RecordingUpstream:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        listener.settimeout(0.1)
        self.port = listener.getsockname()[1]
        self._listener = listener
        accept = threading.Thread(target=self._accept_loop, daemon=True)
        accept.start()
        self._threads.append(accept)
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
        for thread in list(self._threads):
            thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def __enter__(self) -> RecordingUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def sessions(self) -> list[ScriptedUpstream]:
        """Each connection's record so far, in the order they were accepted."""
        with self._lock:
            return list(self._sessions)

    def wait_closed(self, count: int, timeout: float = 10.0) -> list[ScriptedUpstream]:
        """Wait until at least ``count`` connections were accepted and all are closed."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not (len(self._sessions) >= count and all(self._closed)):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"{len(self._sessions)} connection(s), "
                        f"{self._closed.count(False)} still open; {count} expected"
                    )
                self._changed.wait(remaining)
            return list(self._sessions)

    # -- internals

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(30)
            with self._lock:
                index = len(self._sessions)
                record = ScriptedUpstream(**self.settings)
                self._sessions.append(record)
                self._closed.append(False)
                self._clients.add(client)
            thread = threading.Thread(target=self._serve, args=(client, record, index), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, client: socket.socket, record: ScriptedUpstream, index: int) -> None:
        talk = record.conversation()
        record.sessions += 1
        try:
            client.sendall(talk.take())
            while not talk.done:
                data = client.recv(record.read_bytes)
                if not data:
                    break
                talk.feed(data)
                if out := talk.take():
                    client.sendall(out)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                client.close()
            with self._changed:
                self._clients.discard(client)
                self._closed[index] = True
                self._changed.notify_all()
