"""One mail transaction's own state: made at MAIL, replaced (never reset) by
the next MAIL.  Everything that belongs to one message lives here, so a new
transaction cannot inherit a field someone forgot to reset."""

from __future__ import annotations

from .queue import Slot


class Transaction:
    """Per-message state, from MAIL to the reply to its end."""

    __slots__ = (
        "rcpts",
        "annotated",
        "size_reported",
        "content_bytes",
        "bdat_tail",
        "bdat_bare",
        "last_chunk",
        "smtputf8",
    )

    def __init__(self) -> None:
        #: RCPTs forwarded.
        self.rcpts = 0
        #: The annotation header is out (it goes once, before the content).
        self.annotated = False
        #: The size limit was reported (observe mode: once per message).
        self.size_reported = False
        #: Content bytes relayed and not yet handed to the reply that ends
        #: the message (the next MAIL may come before that reply: RFC 2920).
        self.content_bytes = 0
        #: A CR ending the last BDAT chunk (it may pair with the next's LF).
        self.bdat_tail = b""
        #: A bare CR or LF in BDAT content was reported.
        self.bdat_bare = False
        #: The ``BDAT n LAST`` slot while its chunk is still being relayed.
        self.last_chunk: Slot | None = None
        #: The MAIL carried SMTPUTF8 (RFC 6531): 8-bit addresses may follow.
        self.smtputf8 = False
