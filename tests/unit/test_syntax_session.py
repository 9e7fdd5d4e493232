"""The syntax guard inside the session (protocol/arguments.py): what reaches
the upstream in each mode of ``policy.syntax``, what the client is told,
which events are counted; ``commands.refuse``; ``body.eight_bit: reject``.
The grammar itself is tested in test_syntax.py."""

from __future__ import annotations

import pytest
from support.driver import Peer
from support.ehlo import ehlo_reply

from smtpguard.config import ConfigError, load
from smtpguard.protocol.events import Event, Normalized, PolicyAction, SyntaxFinding
from smtpguard.protocol.policy import Defence, Policy
from smtpguard.protocol.rules import Verb

#: A Postfix-like upstream with the parameter extensions.
EHLO_PARAMS = ehlo_reply(
    b"up.example",
    b"PIPELINING",
    b"SIZE 10000000",
    b"ENHANCEDSTATUSCODES",
    b"8BITMIME",
    b"DSN",
    b"SMTPUTF8",
)
#: A legacy upstream: no 8BITMIME, no SIZE, no DSN.
EHLO_LEGACY = ehlo_reply(b"legacy.example", b"PIPELINING", b"ENHANCEDSTATUSCODES")


def peer(syntax: str = "normalize", ehlo: bytes = EHLO_PARAMS, **policy: object) -> Peer:
    p = Peer(policy=Policy(syntax=syntax, **policy))  # type: ignore[arg-type]
    p.ready(ehlo)
    p.s.take_events()
    return p


def of_type(events: list[Event], kind: type) -> list[Event]:
    return [e for e in events if type(e) is kind]


@pytest.mark.parametrize(
    ("sent", "forwarded"),
    [
        (b"mail from: <a@b.example>", b"MAIL FROM:<a@b.example>"),
        (b"MAIL FROM:a@b.example", b"MAIL FROM:<a@b.example>"),
        (b"MAIL FROM:<@relay.example:a@b.example>", b"MAIL FROM:<a@b.example>"),
        (b"MAIL FROM:<a@b.example>   size=100  ", b"MAIL FROM:<a@b.example> SIZE=100"),
    ],
)
def test_normalize_forwards_the_canonical_form_and_counts_it(sent: bytes, forwarded: bytes) -> None:
    p = peer()
    assert p.client(sent + b"\r\n") == (forwarded + b"\r\n", b"")
    assert of_type(p.s.take_events(), Normalized) == [Normalized(Verb.MAIL)]


def test_a_canonical_command_is_forwarded_as_it_came_and_not_counted() -> None:
    p = peer()
    assert p.client(b"MAIL FROM:<a@b.example> SIZE=100\r\n")[0] == (
        b"MAIL FROM:<a@b.example> SIZE=100\r\n"
    )
    events = p.s.take_events()
    assert of_type(events, Normalized) == []
    assert of_type(events, SyntaxFinding) == []


def test_observe_forwards_the_line_as_sent_but_reports_it() -> None:
    p = peer("observe")
    line = b"MAIL FROM:<a@b.example>\r\n"
    p.client(line)
    p.upstream(b"250 ok\r\n")
    odd = b"RCPT TO:<" + b"x" * 70 + b"@b.example>\r\n"  # local part over 64: strict refuses
    assert p.client(odd) == (odd, b"")
    assert of_type(p.s.take_events(), Normalized) == []


@pytest.mark.parametrize(
    ("line", "reply", "reason"),
    [
        (b"MAIL FROM:<" + b"x" * 300 + b"@b.example>", b"501 5.1.7 ", "local_part_too_long"),
        (b"MAIL FROM:<a\x01b@c.example>", b"501 5.1.7 ", "control_character"),
        (b"MAIL FROM:<a@b.example> XFOO=bar", b"555 5.5.4 ", "unknown_parameter"),
    ],
)
def test_strict_refuses_locally_and_the_upstream_never_sees_it(
    line: bytes, reply: bytes, reason: str
) -> None:
    p = peer("strict")
    up, down = p.client(line + b"\r\n")
    assert up == b""
    assert down.startswith(reply)
    found = of_type(p.s.take_events(), SyntaxFinding)
    assert len(found) == 1
    finding = found[0]
    assert isinstance(finding, SyntaxFinding)
    assert (finding.verb, finding.reason, finding.refused) == (Verb.MAIL, reason, True)
    assert finding.argument_bytes == len(line) - len(b"MAIL ")
    # The session goes on: a good MAIL is forwarded.
    assert p.client(b"MAIL FROM:<a@b.example>\r\n")[0] == b"MAIL FROM:<a@b.example>\r\n"


def test_a_parameter_the_upstream_did_not_advertise_is_refused_in_every_mode() -> None:
    for mode in ("observe", "normalize", "strict"):
        p = peer(mode, EHLO_LEGACY)
        up, down = p.client(b"MAIL FROM:<a@b.example> RET=HDRS\r\n")
        assert (up, down[:10]) == (b"", b"555 5.5.4 "), mode


def test_an_eight_bit_address_needs_smtputf8_in_strict_mode() -> None:
    p = peer("strict")
    p.client(b"MAIL FROM:<a@b.example>\r\n")
    p.upstream(b"250 ok\r\n")
    up, down = p.client("RCPT TO:<é@b.example>\r\n".encode())
    assert up == b"" and down.startswith(b"553 5.6.7 ")
    p.client(b"RSET\r\n")
    p.upstream(b"250 ok\r\n")
    p.client(b"MAIL FROM:<a@b.example> SMTPUTF8\r\n")
    p.upstream(b"250 ok\r\n")
    rcpt = "RCPT TO:<é@b.example>\r\n".encode()
    assert p.client(rcpt) == (rcpt, b"")


def test_smtpguards_own_size_never_reaches_an_upstream_without_size() -> None:
    # smtpguard announces SIZE itself (max_message_bytes) to a legacy upstream.
    p = peer(ehlo=EHLO_LEGACY, max_message_bytes=1000)
    up, down = p.client(b"MAIL FROM:<a@b.example> SIZE=500\r\n")
    assert (up, down) == (b"MAIL FROM:<a@b.example>\r\n", b"")
    p.upstream(b"250 ok\r\n")
    p.client(b"RSET\r\n")
    p.upstream(b"250 ok\r\n")
    up, down = p.client(b"MAIL FROM:<a@b.example> SIZE=5000\r\n")
    assert up == b"" and down.startswith(b"552 5.3.4 ")


def test_after_helo_known_parameters_go_on_except_in_strict_mode() -> None:
    # Postfix accepts SIZE after HELO; RFC 5321 offers no extension after HELO.
    for mode, forwarded in (("normalize", True), ("strict", False)):
        p = Peer(policy=Policy(syntax=mode))  # type: ignore[arg-type]
        p.upstream(b"220 up ESMTP\r\n")
        p.client(b"HELO c.example\r\n")
        p.upstream(b"250 up\r\n")
        up, down = p.client(b"MAIL FROM:<a@b.example> SIZE=10\r\n")
        if forwarded:
            assert (up, down) == (b"MAIL FROM:<a@b.example> SIZE=10\r\n", b"")
        else:
            assert up == b"" and down.startswith(b"555 ")


def test_a_refused_verb_is_answered_in_any_state_and_hidden_from_ehlo() -> None:
    p = Peer(
        policy=Policy(refused_commands=frozenset({b"VRFY", b"XDEBUG"})),
        discard_keywords=frozenset({"VRFY"}),
    )
    p.upstream(b"220 up ESMTP\r\n")
    # Before EHLO, no enhanced code (as every reply smtpguard makes then).
    assert p.client(b"VRFY root\r\n") == (b"", b"502 VRFY command is disabled\r\n")
    p.client(b"EHLO c\r\n")
    _, ehlo = p.upstream(ehlo_reply(b"up", b"PIPELINING", b"VRFY", b"ENHANCEDSTATUSCODES"))
    assert b"VRFY" not in ehlo and b"PIPELINING" in ehlo
    p.client(b"MAIL FROM:<a@b.example>\r\n")
    p.upstream(b"250 ok\r\n")
    assert p.client(b"xdebug on\r\n") == (b"", b"502 5.5.1 XDEBUG command is disabled\r\n")
    assert p.client(b"VRFY root\r\n")[0] == b""
    refused = of_type(p.s.take_events(), PolicyAction)
    assert [e.defence for e in refused if isinstance(e, PolicyAction)] == [
        Defence.REFUSED_COMMAND
    ] * 3


def test_commands_refuse_in_the_config() -> None:
    config = load({"commands": {"refuse": ["vrfy", "EXPN", "XDEBUG"]}})
    assert config.session.policy.refused_commands == {b"VRFY", b"EXPN", b"XDEBUG"}
    assert {"VRFY", "EXPN"} <= config.session.discard_keywords
    for bad, key in (
        ({"refuse": "VRFY"}, "commands.refuse"),
        ({"refuse": ["MAIL"]}, "commands.refuse[0]"),
        ({"refuse": ["VRFY", "two words"]}, "commands.refuse[1]"),
        ({"deny": ["VRFY"]}, "commands.deny"),
    ):
        with pytest.raises(ConfigError) as err:
            load({"commands": bad})
        assert err.value.key == key


def test_body_eight_bit_in_the_config() -> None:
    assert not load({}).session.policy.reject_eight_bit
    assert load({"body": {"eight_bit": "reject"}}).session.policy.reject_eight_bit
    # policy.mode: observe refuses nothing
    observe = load({"body": {"eight_bit": "reject"}, "policy": {"mode": "observe"}})
    assert not observe.session.policy.reject_eight_bit
    with pytest.raises(ConfigError) as err:
        load({"body": {"eight_bit": "drop"}})
    assert err.value.key == "body.eight_bit"


def test_policy_syntax_in_the_config() -> None:
    assert load({}).session.policy.syntax == "normalize"
    assert load({"policy": {"syntax": "strict"}}).session.policy.syntax == "strict"
    assert load({"policy": {"mode": "observe"}}).session.policy.syntax == "observe"
    with pytest.raises(ConfigError) as err:
        load({"policy": {"syntax": "reject"}})
    assert err.value.key == "policy.syntax"


def eight_bit_peer(ehlo: bytes) -> Peer:
    p = peer(ehlo=ehlo, reject_eight_bit=True)
    p.client(b"MAIL FROM:<a@b.example>\r\n")
    p.upstream(b"250 ok\r\n")
    p.client(b"RCPT TO:<c@d.example>\r\n")
    p.upstream(b"250 ok\r\n")
    p.client(b"DATA\r\n")
    p.upstream(b"354 go\r\n")
    p.s.take_events()
    return p


def test_an_eight_bit_body_for_an_upstream_without_8bitmime_is_refused_before_the_dot() -> None:
    p = eight_bit_peer(EHLO_LEGACY)
    assert p.client(b"Subject: plain\r\n\r\nascii line\r\n") == (
        b"Subject: plain\r\n\r\nascii line\r\n",
        b"",
    )
    up, down = p.client("caf\u00e9\r\n.\r\n".encode())
    assert up == b""  # neither the 8-bit line nor the end of the message
    assert down == b"554 5.6.1 Error: 8-bit content is not accepted here\r\n"
    assert p.s.closed and p.s.close_reason == "policy"
    actions = of_type(p.s.take_events(), PolicyAction)
    assert [(e.defence, e.action) for e in actions if isinstance(e, PolicyAction)] == [
        (Defence.EIGHT_BIT, "reject")
    ]


def test_an_eight_bit_body_passes_when_the_upstream_has_8bitmime() -> None:
    p = eight_bit_peer(EHLO_PARAMS)
    body = "caf\u00e9\r\n.\r\n".encode()
    assert p.client(body) == (body, b"")
    assert not p.s.closed


def test_body_8bitmime_is_refused_at_mail_for_an_upstream_without_it() -> None:
    p = peer(ehlo=EHLO_LEGACY, reject_eight_bit=True)
    up, down = p.client(b"MAIL FROM:<a@b.example> BODY=8BITMIME\r\n")
    assert up == b""
    assert down == b"554 5.6.1 Error: 8-bit content is not accepted here\r\n"
    assert not p.s.closed  # nothing was sent yet: the session goes on
    # Without the policy the parameter goes on (the upstream decides).
    q = peer(ehlo=EHLO_LEGACY)
    assert q.client(b"MAIL FROM:<a@b.example> BODY=8BITMIME\r\n")[0] == (
        b"MAIL FROM:<a@b.example> BODY=8BITMIME\r\n"
    )


def test_a_bare_verb_skips_the_grammar_and_gets_the_same_verdict() -> None:
    from smtpguard.protocol.arguments import BARE
    from smtpguard.protocol.syntax import Mode, check

    assert {b"DATA", b"QUIT", b"RSET", b"NOOP", b"HELP"} <= BARE
    assert not {b"VRFY", b"EXPN", b"ETRN", b"EHLO", b"HELO", b"MAIL"} & BARE
    for mode in ("observe", "normalize", "strict"):
        p = peer(mode)
        for line in BARE:
            verb = Verb(line.decode())
            fast = p.s._syntax.judge(verb, line, False)
            full = check(verb, line, mode=Mode(mode))
            assert (fast.forward, fast.reason, fast.changed) == (
                full.forward,
                full.reason,
                full.changed,
            ), (mode, line)


@pytest.mark.parametrize(
    "mail",
    [b"MAIL FROM:<smtputf8@b.example>", b"MAIL FROM:<a@b.example> ENVID=SMTPUTF8"],
)
def test_only_the_smtputf8_parameter_declares_smtputf8(mail: bytes) -> None:
    p = peer("strict")
    p.client(mail + b"\r\n")
    p.upstream(b"250 ok\r\n")
    up, down = p.client("RCPT TO:<\u00e9@b.example>\r\n".encode())
    assert up == b"" and down.startswith(b"553 5.6.7 ")


@pytest.mark.parametrize("mode", ["observe", "normalize", "strict"])
def test_smtpguards_own_size_is_taken_off_by_its_word_not_by_its_text(mode: str) -> None:
    p = peer(mode, EHLO_LEGACY, max_message_bytes=1000)
    quoted = b'MAIL FROM:<"a SIZE=1 b"@b.example> SIZE=10\r\n'
    assert p.client(quoted)[0] == b'MAIL FROM:<"a SIZE=1 b"@b.example>\r\n'
    p.upstream(b"250 ok\r\n")
    p.client(b"RSET\r\n")
    p.upstream(b"250 ok\r\n")
    assert p.client(b"MAIL FROM:<a@b.example>\tSIZE=10\r\n")[0] == b"MAIL FROM:<a@b.example>\r\n"


def test_body_8bitmime_is_read_as_a_parameter_not_as_text() -> None:
    p = peer(ehlo=EHLO_LEGACY, reject_eight_bit=True)
    line = b'MAIL FROM:<"x BODY=8BITMIME"@b.example>\r\n'
    assert p.client(line) == (line, b"")
