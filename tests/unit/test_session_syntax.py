"""The session's side of issue 14, sans-I/O: ``commands.refuse`` in every state, and the
syntax guard seeing a command the way Postfix's smtpd cuts it.

``tests/unit/test_syntax.py`` checks the grammar on its own; here the whole core
(:class:`~smtpguard.protocol.Session` through :class:`~support.driver.Peer`) decides, so
what is tested is what reaches the upstream and what the client hears.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from support.driver import Peer
from support.postfix_probe import CORPUS

from smtpguard.config import ConfigError, load
from smtpguard.protocol.events import PolicyAction
from smtpguard.protocol.policy import Action, Defence, Policy

REFUSED = frozenset({b"VRFY", b"EXPN", b"XDEBUG"})


def refusing_peer(**policy: object) -> Peer:
    return Peer(policy=Policy(refused_commands=REFUSED, **policy))  # type: ignore[arg-type]


def greeted(peer: Peer) -> None:
    assert peer.upstream(b"220 up ESMTP\r\n") == (b"", b"220 up ESMTP\r\n")


def after_helo(peer: Peer) -> None:
    greeted(peer)
    assert peer.client(b"HELO c.example\r\n") == (b"HELO c.example\r\n", b"")
    assert peer.upstream(b"250 up\r\n") == (b"", b"250 up\r\n")


def after_ehlo(peer: Peer) -> None:
    peer.ready()


def in_mail(peer: Peer) -> None:
    peer.ready()
    assert peer.client(b"MAIL FROM:<a@example.com>\r\n")[0] == b"MAIL FROM:<a@example.com>\r\n"
    peer.upstream(b"250 2.1.0 ok\r\n")


def in_rcpt(peer: Peer) -> None:
    peer.ready()
    peer.envelope()


def after_message(peer: Peer) -> None:
    peer.ready()
    peer.envelope()
    assert peer.client(b"DATA\r\n")[0] == b"DATA\r\n"
    assert peer.upstream(b"354 go ahead\r\n")[1] == b"354 go ahead\r\n"
    assert peer.client(b"x\r\n.\r\n")[0] == b"x\r\n.\r\n"
    assert peer.upstream(b"250 2.0.0 queued\r\n")[1] == b"250 2.0.0 queued\r\n"


#: (state, how to get there, whether the client may see enhanced codes: EHLO
#: offered ENHANCEDSTATUSCODES, RFC 2034).
STATES: list[tuple[str, Callable[[Peer], None], bool]] = [
    ("greeted", greeted, False),
    ("after HELO", after_helo, False),
    ("after EHLO", after_ehlo, True),
    ("in MAIL", in_mail, True),
    ("in RCPT", in_rcpt, True),
    ("after a message", after_message, True),
]


@pytest.mark.parametrize(("state", "reach", "enhanced"), STATES, ids=[s[0] for s in STATES])
@pytest.mark.parametrize(
    ("line", "verb"),
    [
        (b"VRFY postmaster", "VRFY"),
        (b"vrfy postmaster", "VRFY"),
        (b"VRFY", "VRFY"),
        (b"EXPN staff", "EXPN"),
        (b"XDEBUG on", "XDEBUG"),
    ],
)
def test_a_refused_verb_is_answered_502_locally_in_every_state(
    state: str, reach: Callable[[Peer], None], enhanced: bool, line: bytes, verb: str
) -> None:
    peer = refusing_peer()
    reach(peer)
    peer.s.take_events()
    up, down = peer.client(line + b"\r\n")
    code = "502 5.5.1" if enhanced else "502"
    assert (up, down) == (b"", f"{code} {verb} command is disabled\r\n".encode())
    events = peer.s.take_events()
    assert PolicyAction(Defence.REFUSED_COMMAND, Action.REJECT, "refused verb") in events
    # The session goes on where it was: a NOOP is still forwarded.
    assert peer.client(b"NOOP\r\n") == (b"NOOP\r\n", b"")


def test_a_refused_verb_does_not_count_as_an_unknown_command() -> None:
    # XDEBUG is no SMTP verb: refused, it must not use up the junk-command budget.
    peer = refusing_peer(max_unknown_commands=2)
    peer.ready()
    for _ in range(5):
        assert peer.client(b"XDEBUG on\r\n") == (b"", b"502 5.5.1 XDEBUG command is disabled\r\n")
    assert peer.client(b"NOOP\r\n") == (b"NOOP\r\n", b"")
    assert peer.s.close_reason is None


def test_a_refused_verb_among_pipelined_commands_is_answered_in_its_turn() -> None:
    peer = refusing_peer()
    peer.ready()
    up, down = peer.client(b"MAIL FROM:<a@example.com>\r\nVRFY x\r\nRCPT TO:<b@example.com>\r\n")
    # The RCPT waits for the MAIL's reply (it depends on it); the 502 waits its turn.
    assert (up, down) == (b"MAIL FROM:<a@example.com>\r\n", b"")
    assert peer.upstream(b"250 2.1.0 ok\r\n") == (
        b"RCPT TO:<b@example.com>\r\n",
        b"250 2.1.0 ok\r\n502 5.5.1 VRFY command is disabled\r\n",
    )
    assert peer.upstream(b"250 2.1.5 ok\r\n") == (b"", b"250 2.1.5 ok\r\n")


def test_without_commands_refuse_vrfy_and_expn_are_forwarded() -> None:
    # The control: the 502 above is commands.refuse, not the session's default.
    peer = Peer()
    peer.ready()
    assert peer.client(b"VRFY postmaster\r\n") == (b"VRFY postmaster\r\n", b"")
    peer.upstream(b"252 2.0.0 postmaster\r\n")
    assert peer.client(b"EXPN staff\r\n") == (b"EXPN staff\r\n", b"")


def test_commands_refuse_config_drops_the_ehlo_keywords() -> None:
    config = load({"commands": {"refuse": ["vrfy", "EXPN", "XDebug"]}})
    assert config.session.policy.refused_commands == REFUSED
    assert {"VRFY", "EXPN", "XDEBUG"} <= config.session.discard_keywords


@pytest.mark.parametrize(
    ("refuse", "key"),
    [
        (["VRFY", "MAIL"], "commands.refuse[1]"),
        (["quit"], "commands.refuse[0]"),
        (["VRFY x"], "commands.refuse[0]"),
        ("VRFY", "commands.refuse"),
    ],
)
def test_commands_refuse_config_errors_name_the_key(refuse: object, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load({"commands": {"refuse": refuse}})
    assert err.value.key == key


# -- white space between the verb and its argument -------------------------------------------

#: Lines of the Postfix corpus (tests/support/postfix_probe.py) with a TAB right after
#: the verb: Postfix's smtpd_token() splits words on any white space, and accepted both.
TAB_AFTER_VERB = [p for p in CORPUS if p.line[4:5] == b"\t"]


def test_the_corpus_has_lines_with_a_tab_after_the_verb_that_postfix_accepted() -> None:
    assert {p.line for p in TAB_AFTER_VERB} == {b"MAIL\tFROM:<a@example.com>", b"HELO\tc.example"}
    assert all(p.accepted for p in TAB_AFTER_VERB)


@pytest.mark.parametrize("syntax", ["normalize", "strict"])
def test_a_tab_after_mail_is_normalized_not_an_unknown_command(syntax: str) -> None:
    # Postfix 3.7 answers "MAIL<TAB>FROM:<a@example.com>" with 250.  normalize must not
    # refuse what Postfix accepts, and the canonical form has one SP after the verb.
    peer = Peer(policy=Policy(syntax=syntax))  # type: ignore[arg-type]
    peer.ready()
    up, down = peer.client(b"MAIL\tFROM:<a@example.com>\r\n")
    assert (up, down) == (b"MAIL FROM:<a@example.com>\r\n", b"")


@pytest.mark.parametrize("syntax", ["normalize", "strict"])
def test_a_tab_after_helo_is_normalized_not_an_unknown_command(syntax: str) -> None:
    peer = Peer(policy=Policy(syntax=syntax))  # type: ignore[arg-type]
    greeted(peer)
    assert peer.client(b"HELO\tc.example\r\n") == (b"HELO c.example\r\n", b"")


def test_observe_forwards_a_tab_after_the_verb_unchanged() -> None:
    peer = Peer(policy=Policy(syntax="observe"))  # type: ignore[arg-type]
    peer.ready()
    assert peer.client(b"MAIL\tFROM:<a@example.com>\r\n") == (
        b"MAIL\tFROM:<a@example.com>\r\n",
        b"",
    )
