"""Per-client connection rates and the penalty box (pure, time passed in)."""

from __future__ import annotations

from smtpguard.clientrates import ClientRates, RateSettings, client_key


def test_keys_are_addresses_or_their_networks() -> None:
    exact = RateSettings()
    assert client_key("192.0.2.7", exact) == "192.0.2.7"
    nets = RateSettings(ipv4_prefix=24, ipv6_prefix=64)
    assert client_key("192.0.2.7", nets) == "192.0.2.0/24"
    assert client_key("2001:db8::1:2:3:4", nets) == "2001:db8::/64"
    assert client_key("-", nets) == "-"


def test_connection_rate_in_any_minute() -> None:
    rates = ClientRates(RateSettings(connections_per_minute=3))
    assert [rates.connect("a", t) for t in (0, 1, 2, 3)] == [True, True, True, False]
    assert rates.connect("b", 3)  # each key on its own
    assert not rates.connect("a", 59.9)
    assert rates.connect("a", 60.5)  # the first has left the window


def test_no_limit_when_not_configured() -> None:
    rates = ClientRates(RateSettings())
    assert all(rates.connect("a", t / 10) for t in range(1000))
    assert not rates.violations("a", 1000, 1.0)


def test_the_penalty_box() -> None:
    rates = ClientRates(
        RateSettings(penalty_violations=5, penalty_window_seconds=60, penalty_seconds=600)
    )
    assert not rates.violations("bad", 2, 0)
    assert not rates.violations("bad", 2, 30)
    assert rates.penalized("bad", 31) is None
    assert rates.violations("bad", 1, 40)  # the fifth within the minute: boxed
    assert rates.penalized("bad", 41) == 640
    assert not rates.violations("bad", 9, 50)  # boxed once per period
    assert rates.penalized("bad", 639) == 640
    assert rates.penalized("bad", 640) is None  # the period is over


def test_violations_spread_out_never_box() -> None:
    rates = ClientRates(RateSettings(penalty_violations=3, penalty_window_seconds=10))
    assert not any(rates.violations("slow", 1, t * 11.0) for t in range(20))


def test_message_and_recipient_rates() -> None:
    rates = ClientRates(RateSettings(messages_per_minute=2, recipients_per_minute=3))
    assert [rates.allow("message", "a", t) for t in (0, 1, 2)] == [True, True, False]
    assert [rates.allow("recipient", "a", t) for t in (0, 1, 2, 3)] == [True] * 3 + [False]
    assert rates.allow("message", "b", 2)  # per key
    assert rates.allow("message", "a", 61)  # the window moved on
