"""Fixtures starting real peers on loopback (see peers.py). All are plain sync fixtures."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
from guard import Guard
from mtas import Exim, EximClient, OpenSMTPD
from peers import Postfix, Prometheus

E2E_DIR = Path(__file__).resolve().parent

_Peer = TypeVar("_Peer", Exim, OpenSMTPD, EximClient)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # This hook sees every collected item, not only ours: mark just those under tests/e2e.
    for item in items:
        if Path(item.path).resolve().is_relative_to(E2E_DIR):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def postfix() -> Iterator[Postfix]:
    """A private Postfix (bare LF normalized) shared by the session; filter messages per test."""
    with Postfix() as instance:
        yield instance


@pytest.fixture(scope="session")
def legacy_postfix() -> Iterator[Postfix]:
    """A private Postfix accepting bare LF line endings (smtpd_forbid_bare_newline = no)."""
    with Postfix(legacy=True) as instance:
        yield instance


@pytest.fixture
def postfix_factory() -> Iterator[Callable[..., Postfix]]:
    """Start extra Postfix instances: ``postfix_factory(extra_main_cf={...}, legacy=...)``.

    They are stopped at the end of the test.
    """
    started: list[Postfix] = []

    def start(*, legacy: bool = False, extra_main_cf: Mapping[str, str] | None = None) -> Postfix:
        instance = Postfix(legacy=legacy, extra_main_cf=extra_main_cf)
        started.append(instance)
        return instance.start()

    yield start
    for instance in reversed(started):
        instance.stop()


@pytest.fixture
def postfix_log_offset(postfix: Postfix) -> int:
    """The session Postfix's maillog offset at the start of the test."""
    return postfix.log_offset()


@pytest.fixture
def legacy_postfix_log_offset(legacy_postfix: Postfix) -> int:
    """The legacy Postfix's maillog offset at the start of the test."""
    return legacy_postfix.log_offset()


@pytest.fixture
def prometheus_factory() -> Iterator[Callable[..., Prometheus]]:
    """Start a Prometheus: ``prometheus_factory(["127.0.0.1:9100"], rule_files=[...])``.

    It scrapes the targets' /metrics every second; it is stopped at the end of the test.
    """
    started: list[Prometheus] = []

    def start(targets: Iterable[str], **kwargs: object) -> Prometheus:
        instance = Prometheus(targets, **kwargs)  # type: ignore[arg-type]
        started.append(instance)
        return instance.start()

    yield start
    for instance in reversed(started):
        instance.stop()


@pytest.fixture(scope="session")
def exim() -> Iterator[Exim]:
    """A private Exim 4 that does not advertise PIPECONNECT, so it checks synchronization on
    every command (see mtas.Exim); shared by the session: filter messages per test."""
    with Exim() as instance:
        yield instance


@pytest.fixture(scope="session")
def exim_pipeconnect() -> Iterator[Exim]:
    """A private Exim 4 advertising PIPECONNECT (Exim's default): no synchronization check
    before the first DATA/BDAT."""
    with Exim(pipeconnect=True) as instance:
        yield instance


@pytest.fixture(scope="session")
def opensmtpd() -> Iterator[OpenSMTPD]:
    """A private OpenSMTPD (no PIPELINING, no CHUNKING) shared by the session."""
    with OpenSMTPD() as instance:
        yield instance


@pytest.fixture
def mta_factory() -> Iterator[Callable[..., Any]]:
    """Start extra Exim / OpenSMTPD servers or Exim clients, stopped at the end of the test:
    ``mta_factory(Exim, pipeconnect=True)``, ``mta_factory(OpenSMTPD)``,
    ``mta_factory(EximClient, (host, port), chunking=False)``."""
    started: list[Exim | OpenSMTPD | EximClient] = []

    def start(cls: type[_Peer], *args: Any, **kwargs: Any) -> _Peer:
        instance = cls(*args, **kwargs)
        started.append(instance)
        instance.start()
        return instance

    yield start
    for instance in reversed(started):
        instance.stop()


@pytest.fixture
def guard_factory() -> Iterator[Callable[..., Guard]]:
    """Start smtpguard subprocesses, stopped at the end of the test:
    ``guard_factory("127.0.0.1:PORT", policy={"sequence": "observe"})`` (see guard.Guard).

    One Guard per test keeps its metrics and log to that test alone."""
    started: list[Guard] = []

    def start(upstream: str | None, **config: Any) -> Guard:
        instance = Guard(upstream, **config)
        started.append(instance)
        return instance.start()

    yield start
    for instance in reversed(started):
        instance.stop()
