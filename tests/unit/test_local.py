"""The local answers (protocol/local.py), alone."""

from __future__ import annotations

from smtpguard.protocol import ehlo, local
from smtpguard.protocol import replies as R
from smtpguard.protocol.options import SessionOptions
from smtpguard.protocol.rules import Verb

UPSTREAM_EHLO = (
    b"250-up.example Hello\r\n",
    b"250-PIPELINING\r\n",
    b"250-8BITMIME\r\n",
    b"250 ENHANCEDSTATUSCODES\r\n",
)
OPTS = SessionOptions(
    hostname="guard.example",
    help_text=("general",),
    help_topics={"MAIL": ("mail help",)},
)


def test_help_text_by_topic() -> None:
    assert local.help_text(b"HELP", OPTS) == ("general",)
    assert local.help_text(b"HELP  mail \t", OPTS) == ("mail help",)
    assert local.help_text(b"HELP RCPT", OPTS) == ("general",)


def test_help_reply_renders_when_sent() -> None:
    render = local.help_reply(b"HELP MAIL", OPTS)
    assert render(True) == R.help_reply(("mail help",), True)
    assert render(False) == R.help_reply(("mail help",), False)
    assert render(True).startswith(b"214-2.0.0 mail help\r\n")


def test_identify_ehlo_is_the_rewritten_upstream_reply() -> None:
    data, caps = local.identify(Verb.EHLO, UPSTREAM_EHLO, OPTS, True)
    assert (data, caps) == ehlo.rewrite(UPSTREAM_EHLO, OPTS, True)
    assert data.startswith(b"250-up.example")
    assert caps.enhanced


def test_identify_helo_has_no_extensions() -> None:
    assert local.identify(Verb.HELO, UPSTREAM_EHLO, OPTS, True) == (
        b"250 up.example\r\n",
        ehlo.NO_EXTENSIONS,
    )
    nameless = (b"250 \r\n",)
    assert local.identify(Verb.HELO, nameless, OPTS, True)[0] == b"250 guard.example\r\n"
