"""Micro-benchmark of the sans-I/O core alone: one small-message session,
fed as the I/O layer would feed it, many times over.

Run ``python bench/core_micro.py [N]`` for wall time per session, or under
``valgrind --tool=callgrind`` / ``perf stat -e instructions`` for repeatable
counts (N small, e.g. 2000).  Only the core is measured: no sockets, no
metrics, no trio.
"""

from __future__ import annotations

import sys
import time

from smtpguard.protocol import Session, SessionOptions

GREETING = b"220 upstream.example ESMTP Postfix\r\n"
EHLO_REPLY = (
    b"250-upstream.example\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-VRFY\r\n"
    b"250-ETRN\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n"
    b"250-SMTPUTF8\r\n250 CHUNKING\r\n"
)
BODY = (
    b"From: a@example.org\r\nTo: b@example.net\r\nSubject: bench\r\n\r\n"
    + b"".join(b"line %04d " % i + b"x" * 60 + b"\r\n" for i in range(14))
    + b".\r\n"
)
# (who, bytes): the order of reads in one session (client pipelines
# MAIL/RCPT/DATA, as smtplib with PIPELINING does not, but swaks/Postfix do).
SCRIPT: list[tuple[str, bytes]] = [
    ("up", GREETING),
    ("client", b"EHLO client.example\r\n"),
    ("up", EHLO_REPLY),
    ("client", b"MAIL FROM:<a@example.org>\r\n"),
    ("up", b"250 2.1.0 Ok\r\n"),
    ("client", b"RCPT TO:<b@example.net>\r\n"),
    ("up", b"250 2.1.5 Ok\r\n"),
    ("client", b"DATA\r\n"),
    ("up", b"354 End data with <CR><LF>.<CR><LF>\r\n"),
    ("client", BODY),
    ("up", b"250 2.0.0 Ok: queued as 4ABCDEF\r\n"),
    ("client", b"QUIT\r\n"),
    ("up", b"221 2.0.0 Bye\r\n"),
]


def one_session(options: SessionOptions) -> int:
    s = Session(options)
    n = 0
    for who, data in SCRIPT:
        if who == "up":
            s.receive_upstream(data)
        else:
            s.receive_client(data)
        n += len(s.take_events())
        s.take_client_bytes()
        s.take_upstream_bytes()
    assert s.closed and s.close_reason == "quit", s.close_reason
    return n


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    options = SessionOptions()
    one_session(options)  # warm the caches
    start = time.perf_counter()
    for _ in range(n):
        one_session(options)
    elapsed = time.perf_counter() - start
    print(f"{n} sessions: {elapsed * 1e6 / max(n, 1):.1f} us/session")


if __name__ == "__main__":
    main()
