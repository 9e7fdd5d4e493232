"""Upstream selection: which upstreams a listener has, in which order they
are tried, and how a failed connect is labelled (no sockets)."""

from __future__ import annotations

import errno

import trio
from prometheus_client import CollectorRegistry

from smtpguard.config import Address, load
from smtpguard.metrics import Metrics
from smtpguard.upstreams import Upstreams, connect_failure_reason, rotation

A, B, C = Address("192.0.2.1", 25), Address("192.0.2.2", 25), Address("192.0.2.3", 25)


def upstreams(**raw: object) -> Upstreams:
    config = load({"upstream": ["192.0.2.1", "192.0.2.2"], **raw})
    return Upstreams(config, Metrics(CollectorRegistry()))


def test_rotation_starts_anywhere_and_wraps() -> None:
    assert rotation((A, B, C), 0) == [A, B, C]
    assert rotation((A, B, C), 1) == [B, C, A]
    assert rotation((A, B, C), 5) == [C, A, B]
    assert rotation((A,), 7) == [A]


def test_ordered_selection_always_starts_with_the_first() -> None:
    u = upstreams()
    assert [u.order((A, B)) for _ in range(3)] == [[A, B]] * 3


def test_round_robin_turns_per_list() -> None:
    u = upstreams(upstream_selection="round_robin")
    assert [u.order((A, B))[0] for _ in range(4)] == [A, B, A, B]
    assert u.order((C, A, B)) == [C, A, B]  # another list: its own turn
    assert u.order((A, B)) == [A, B]


def test_listeners_have_their_own_upstreams_and_every_address_one_index() -> None:
    u = upstreams(
        listen=[
            "127.0.0.1:2525",
            {"address": "127.0.0.1:2526", "upstream": ["192.0.2.3", "192.0.2.1"]},
        ]
    )
    assert u.for_listener(None) == (A, B)
    spec = u.config.listeners[1]
    assert u.for_listener(spec) == (C, A)
    assert u.for_listener(u.config.listeners[0]) == (A, B)
    assert u.addresses == (A, B, C)  # global first; each once (the health label)


def test_a_fixed_upstream_survives_a_reload() -> None:
    config = load({"upstream": "192.0.2.1"})
    u = Upstreams(config, Metrics(CollectorRegistry()), upstream=C)
    assert u.for_listener(None) == (C,)
    u.use(load({"upstream": "192.0.2.2"}))
    assert u.default == C and u.for_listener(None) == (C,)
    given = Upstreams(config, Metrics(CollectorRegistry()))
    given.use(load({"upstream": "192.0.2.2"}))
    assert given.default == B


def test_banners_are_remembered_per_address() -> None:
    u = upstreams()
    assert u.banner(None) is None
    u.remember_banner(B, b"b.example ESMTP")
    assert u.banner(None) is None  # the first upstream's, not any
    u.remember_banner(A, b"a.example ESMTP")
    assert u.banner(None) == b"a.example ESMTP"


def test_connect_failures_are_labelled_from_a_closed_set() -> None:
    assert connect_failure_reason(ConnectionRefusedError()) == "refused"
    assert connect_failure_reason(trio.TooSlowError()) == "timeout"
    assert connect_failure_reason(OSError(errno.EHOSTUNREACH, "x")) == "unreachable"
    assert connect_failure_reason(OSError(errno.ENETUNREACH, "x")) == "unreachable"
    assert connect_failure_reason(OSError(errno.EACCES, "x")) == "error"
    # trio.open_tcp_stream: an OSError caused by a group of the attempts' errors
    wrapped = OSError("all attempts failed")
    wrapped.__cause__ = ExceptionGroup("attempts", [ConnectionRefusedError(), OSError()])
    assert connect_failure_reason(wrapped) == "refused"
