"""smtpguard's TLS against scanners and the wire: Mozilla's "intermediate" profile end to end.

A real smtpguard (subprocess) in front of the session's Postfix, with a STARTTLS listener and
an implicit-TLS one, checked from outside only:

1. sslyze's Mozilla intermediate verdict, and what it found (TLS 1.2 + 1.3, TLS 1.2 suites
   ECDHE with AES-GCM or ChaCha20, groups X25519, P-256, P-384), cross-checked per group and
   version with ``openssl s_client -groups``; ``tls.groups`` / ``tls.ciphers`` (and the same
   under ``upstream_tls``) honoured, and refused by ``smtpguard check`` when they name nothing;
2. after ``220 Ready to start TLS`` not one plaintext byte: a client that stalls, or talks
   plaintext, is closed without a reply;
3. alerts read off the wire (raw records, not the client's error text): protocol_version (70)
   for a TLS 1.0 hello, handshake_failure (40) for a client with no shared suite, close_notify
   after ``QUIT``/``221``;
4. ``workers: 2``: a reconnecting client resumes (TLS 1.2 and 1.3) whichever worker accepts;
5. ``smtpguard_tls_handshake_failures_total{listener, reason}`` counts each failure once, with
   the right reason, per listener kind.

sslyze's ``modern`` verdict is printed, not asserted.  The same probes against Postfix are in
tls_compare.py (``test_postfix_side_by_side`` prints the table).
"""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from guard import Guard
from peers import Postfix, free_port
from peers_tls import Certs, tls_postfix
from tls_scan import (
    FATAL,
    HANDSHAKE_FAILURE,
    PROTOCOL_VERSION,
    ScanSummary,
    Target,
    WireTLS,
    client_context,
    close_probe,
    describe_alerts,
    handshake_probe,
    looks_like_tls,
    make_scan_certs,
    one_session,
    open_for_tls,
    openssl_group_probe,
    sslyze_scan,
)

LISTENERS = ("starttls", "implicit")
#: handshake deadline in these tests (``timeouts.client_command_seconds`` bounds the STARTTLS
#: handshake, ``timeouts.connect_seconds`` the implicit one: both are set)
HANDSHAKE_SECONDS = 2
TIMEOUTS = {"client_command_seconds": HANDSHAKE_SECONDS, "connect_seconds": HANDSHAKE_SECONDS}

INTERMEDIATE_GROUPS = {"X25519", "secp256r1", "secp384r1"}  # sslyze's names
INTERMEDIATE_TLS13 = {
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
}
INTERMEDIATE_TLS12 = {
    "ecdsa": {
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    },
    "rsa": {
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
    },
}
ECDHE_AEAD = re.compile(
    r"^TLS_ECDHE_(ECDSA|RSA)_WITH_(AES_128_GCM_SHA256|AES_256_GCM_SHA384|CHACHA20_POLY1305_SHA256)$"
)
#: the groups ``openssl s_client -groups`` offers, and whether intermediate accepts them alone
GROUPS = {"X25519": True, "P-256": True, "P-384": True, "X448": False, "P-521": False}
#: the ``Server Temp Key`` s_client shows for each accepted group
TEMP_KEY = {"X25519": "X25519", "P-256": "prime256v1", "P-384": "secp384r1"}
#: TLS 1.2 suites a client may offer alone that intermediate refuses (an ECDSA certificate):
#: a plain-RSA SHA-1 one, and ECDHE CBC ones that Python's and OpenSSL's defaults still have
REFUSED_TLS12 = ("AES128-SHA", "ECDHE-ECDSA-AES128-SHA256", "ECDHE-ECDSA-AES256-SHA")
REASONS = ("protocol_version", "no_shared_cipher", "client_closed", "timeout", "other")
FAILURES = "smtpguard_tls_handshake_failures_total"
TLS_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


# --------------------------------------------------------------------------- set-up


@dataclass
class TLSGuard:
    """A started :class:`Guard` with a STARTTLS listener and an implicit-TLS one."""

    guard: Guard
    targets: dict[str, Target]
    certs: Certs
    scans: dict[tuple[str, str], ScanSummary] = field(default_factory=dict)

    def scan(self, listener: str, profile: str = "intermediate") -> ScanSummary:
        """sslyze against one listener, once per (listener, profile)."""
        key = (listener, profile)
        if key not in self.scans:
            summary = sslyze_scan(
                self.targets[listener], profile=profile, ca_file=self.certs.ca_pem
            )
            print(summary.format())
            self.scans[key] = summary
        return self.scans[key]


def tls_settings(certs: Certs, **extra: Any) -> dict[str, Any]:
    return {"certificate": str(certs.cert_pem), "key": str(certs.key_pem), **extra}


def start_tls_guard(
    upstream: Postfix, certs: Certs, *, tls: dict[str, Any] | None = None, **config: Any
) -> TLSGuard:
    ports = {"starttls": free_port(), "implicit": free_port()}
    listen = [
        f"127.0.0.1:{ports['starttls']}",
        {"address": f"127.0.0.1:{ports['implicit']}", "tls": "implicit"},
    ]
    config.setdefault("timeouts", TIMEOUTS)
    guard = Guard(
        f"{upstream.host}:{upstream.port}",
        listen=listen,
        tls=tls_settings(certs, **(tls or {})),
        **config,
    )
    guard.port = ports["starttls"]
    guard.start()
    targets = {
        "starttls": Target("127.0.0.1", ports["starttls"], starttls=True),
        "implicit": Target("127.0.0.1", ports["implicit"], starttls=False),
    }
    return TLSGuard(guard, targets, certs)


@pytest.fixture(scope="module")
def ecdsa_certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_scan_certs(tmp_path_factory.mktemp("scan-ecdsa"))


@pytest.fixture(scope="module")
def rsa_certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_scan_certs(tmp_path_factory.mktemp("scan-rsa"), rsa=True)


@pytest.fixture(scope="module")
def ecdsa_guard(postfix: Postfix, ecdsa_certs: Certs) -> Iterator[TLSGuard]:
    """smtpguard with its defaults (an ECDSA P-256 certificate), one worker."""
    started = start_tls_guard(postfix, ecdsa_certs)
    try:
        yield started
    finally:
        started.guard.stop()


@pytest.fixture(scope="module")
def rsa_guard(postfix: Postfix, rsa_certs: Certs) -> Iterator[TLSGuard]:
    """smtpguard with its defaults and an RSA certificate: in TLS 1.2 an ECDSA certificate's
    curve must be among the client's groups too, which would hide the key-exchange groups."""
    started = start_tls_guard(postfix, rsa_certs)
    try:
        yield started
    finally:
        started.guard.stop()


@pytest.fixture(scope="module")
def two_workers(postfix: Postfix, ecdsa_certs: Certs) -> Iterator[TLSGuard]:
    """smtpguard with ``workers: 2``; longer client timeouts (the probes idle a little)."""
    started = start_tls_guard(postfix, ecdsa_certs, workers=2, timeouts={})
    try:
        wait_serving(started.guard, {"0", "1"})
        yield started
    finally:
        started.guard.stop()


@pytest.fixture
def fresh_guard(postfix: Postfix, ecdsa_certs: Certs) -> Iterator[TLSGuard]:
    """A guard of the test's own (its counters start at 0)."""
    started = start_tls_guard(postfix, ecdsa_certs)
    try:
        yield started
    finally:
        started.guard.stop()


def wait_serving(guard: Guard, workers: set[str]) -> None:
    deadline = time.monotonic() + 15
    while set(re.findall(r"event=listening .*worker=(\d+)", guard.log())) != workers:
        assert time.monotonic() < deadline, guard.log()[-3000:]
        time.sleep(0.1)


def ctx(version: str | None = None, ciphers: str | None = None) -> ssl.SSLContext:
    tls = TLS_VERSIONS[version] if version else None
    return client_context(min_version=tls, max_version=tls, ciphers=ciphers)


def tls10_context() -> ssl.SSLContext:
    """A client that offers TLS 1.0 only (OpenSSL 3 needs security level 0 for it)."""
    return client_context(
        min_version=ssl.TLSVersion.TLSv1,
        max_version=ssl.TLSVersion.TLSv1,
        ciphers="DEFAULT:@SECLEVEL=0",
    )


def refused_suite_context(suite: str) -> ssl.SSLContext:
    """A TLS 1.2 client offering ``suite`` alone."""
    return client_context(max_version=ssl.TLSVersion.TLSv1_2, ciphers=f"{suite}:@SECLEVEL=0")


# --------------------------------------------------------------------------- 1. the profile


@pytest.mark.parametrize("listener", LISTENERS)
@pytest.mark.parametrize("key", ["ecdsa", "rsa"])
def test_sslyze_mozilla_intermediate_compliant(
    listener: str, key: str, ecdsa_guard: TLSGuard, rsa_guard: TLSGuard
) -> None:
    summary = (ecdsa_guard if key == "ecdsa" else rsa_guard).scan(listener)
    assert summary.error is None, summary.format()
    assert summary.compliant is True, summary.format()
    assert summary.issues == {}


@pytest.mark.parametrize("listener", LISTENERS)
@pytest.mark.parametrize("key", ["ecdsa", "rsa"])
def test_sslyze_finds_tls12_and_tls13_only_with_ecdhe_aead_suites(
    listener: str, key: str, ecdsa_guard: TLSGuard, rsa_guard: TLSGuard
) -> None:
    summary = (ecdsa_guard if key == "ecdsa" else rsa_guard).scan(listener)
    assert summary.protocols == ["TLSv1.2", "TLSv1.3"], summary.format()
    tls12 = set(summary.suites["TLSv1.2"])
    assert {s for s in tls12 if not ECDHE_AEAD.match(s)} == set(), summary.format()
    assert tls12 == INTERMEDIATE_TLS12[key], summary.format()
    assert set(summary.suites["TLSv1.3"]) <= INTERMEDIATE_TLS13, summary.format()
    assert summary.fallback_scsv is True and summary.compression is False
    assert summary.extended_master_secret is True and summary.secure_renegotiation is True


@pytest.mark.parametrize("listener", LISTENERS)
def test_sslyze_finds_exactly_the_intermediate_groups(listener: str, rsa_guard: TLSGuard) -> None:
    summary = rsa_guard.scan(listener)
    assert set(summary.groups) == INTERMEDIATE_GROUPS, summary.format()
    for version, groups in summary.negotiated_groups.items():
        assert set(groups) <= INTERMEDIATE_GROUPS, (version, summary.format())


@pytest.mark.parametrize("listener", LISTENERS)
@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
@pytest.mark.parametrize("group", list(GROUPS))
def test_each_group_alone_with_openssl_s_client(
    listener: str, version: str, group: str, rsa_guard: TLSGuard
) -> None:
    probe = openssl_group_probe(rsa_guard.targets[listener], group, version)
    verdict = f"{group} alone over {version}: accepted={probe.accepted} (key {probe.temp_key})"
    assert probe.accepted == GROUPS[group], f"{verdict}\n{probe.output[-1500:]}"
    if probe.accepted:
        assert probe.version == version
        assert probe.temp_key is not None and TEMP_KEY[group] in probe.temp_key, probe.output


def test_configured_groups_and_ciphers_are_honoured(postfix: Postfix, ecdsa_certs: Certs) -> None:
    """``tls.groups`` as a colon string, ``tls.ciphers`` an OpenSSL string (an ECDSA
    certificate: its P-256 curve must stay offered in TLS 1.2)."""
    configured = start_tls_guard(
        postfix,
        ecdsa_certs,
        tls={"groups": "P-256:P-384", "ciphers": "ECDHE-ECDSA-CHACHA20-POLY1305"},
    )
    try:
        for target in configured.targets.values():
            assert not openssl_group_probe(target, "X25519", "TLSv1.3").accepted
            p384 = openssl_group_probe(target, "P-384", "TLSv1.3")
            assert p384.accepted and "secp384r1" in (p384.temp_key or ""), p384.output
            gcm = handshake_probe(target, ctx("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256"))
            assert not gcm.ok, gcm.describe()
            chacha = handshake_probe(target, ctx("TLSv1.2", "ECDHE-ECDSA-CHACHA20-POLY1305"))
            assert chacha.ok and chacha.cipher == "ECDHE-ECDSA-CHACHA20-POLY1305", chacha.describe()
        listed = start_tls_guard(postfix, ecdsa_certs, tls={"groups": ["P-384", "P-256"]})
        try:
            target = listed.targets["starttls"]
            assert not openssl_group_probe(target, "X25519", "TLSv1.3").accepted
            assert openssl_group_probe(target, "P-384", "TLSv1.3").accepted
        finally:
            listed.guard.stop()
    finally:
        configured.guard.stop()


def run_check(tmp_path: Path, config: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "smtpguard.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [sys.executable, "-m", "smtpguard", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )


def base_config(certs: Certs, **extra: Any) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:2525",
        "upstream": "127.0.0.1:10025",
        "metrics": {"listen": "127.0.0.1:9325"},
        "tls": tls_settings(certs),
        **extra,
    }


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("tls", "groups", ["X9999"]),
        ("tls", "groups", "X25519:X9999"),
        ("tls", "ciphers", "NOPE-CIPHER"),
        ("upstream_tls", "groups", ["X9999"]),
        ("upstream_tls", "ciphers", "NOPE-CIPHER"),
    ],
)
def test_check_names_the_bad_group_or_cipher_key(
    tmp_path: Path, ecdsa_certs: Certs, section: str, key: str, value: Any
) -> None:
    config = base_config(ecdsa_certs, upstream_tls={"mode": "opportunistic"})
    config[section] = {**config[section], key: value}
    done = run_check(tmp_path, config)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert f"{section}.{key}" in output, output
    assert "unknown key" not in output, output  # a known key with a value that names nothing


@pytest.mark.parametrize(
    "extra",
    [
        {"tls": {"groups": ["X25519", "P-256"]}},
        {"tls": {"groups": "X25519:P-384", "ciphers": "ECDHE+AESGCM"}},
        {"upstream_tls": {"mode": "opportunistic", "groups": ["P-384"], "ciphers": "ECDHE+AESGCM"}},
        {"upstream_tls": {"mode": "opportunistic", "groups": "X25519:P-256"}},
    ],
)
def test_check_accepts_groups_as_a_list_or_a_colon_string(
    tmp_path: Path, ecdsa_certs: Certs, extra: dict[str, dict[str, Any]]
) -> None:
    config = base_config(ecdsa_certs)
    for section, values in extra.items():
        config[section] = {**config.get(section, {}), **values}
    done = run_check(tmp_path, config)
    assert done.returncode == 0, done.stdout + done.stderr


# --- upstream_tls: what smtpguard offers Postfix, from Postfix's own log


@pytest.fixture(scope="module")
def tls_upstream(ecdsa_certs: Certs) -> Iterator[Postfix]:
    postfix = tls_postfix(ecdsa_certs)
    try:
        yield postfix
    finally:
        postfix.stop()


@pytest.fixture(scope="module")
def cbc_only_upstream(ecdsa_certs: Certs) -> Iterator[Postfix]:
    """A Postfix speaking TLS 1.2 only, with CBC suites only."""
    postfix = tls_postfix(
        ecdsa_certs,
        extra_main_cf={
            "smtpd_tls_protocols": "!SSLv2, !SSLv3, !TLSv1, !TLSv1.1, !TLSv1.3",
            "smtpd_tls_exclude_ciphers": "aNULL, AESGCM, CHACHA20, AESCCM",
        },
    )
    try:
        yield postfix
    finally:
        postfix.stop()


def guard_session(port: int) -> bytes:
    """EHLO and QUIT through smtpguard; what came back (a refused session may be reset)."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(b"EHLO c\r\nQUIT\r\n")
        data, _, _ = read_until_closed(sock, 15)
        return data


def established(postfix: Postfix, offset: int) -> str:
    """Postfix's ``... TLS connection established from ...`` line after ``offset``."""
    match = postfix.wait_for_log(r"TLS connection established from .*$", offset)
    return match.group(0)


def test_upstream_tls_groups_are_offered_to_the_upstream(tls_upstream: Postfix) -> None:
    upstream = f"{tls_upstream.host}:{tls_upstream.port}"
    with Guard(upstream, upstream_tls={"mode": "opportunistic", "groups": ["P-384"]}) as guard:
        offset = tls_upstream.log_offset()
        assert guard_session(guard.port).startswith(b"220 ")
        line = established(tls_upstream, offset)
        assert re.search(r"key-exchange (ECDHE \()?secp384r1\b", line), line


def test_upstream_default_ciphers_refuse_a_cbc_only_upstream(cbc_only_upstream: Postfix) -> None:
    upstream = f"{cbc_only_upstream.host}:{cbc_only_upstream.port}"
    with Guard(upstream, upstream_tls={"mode": "opportunistic"}) as guard:
        offset = cbc_only_upstream.log_offset()
        print("client saw:", guard_session(guard.port))
        cbc_only_upstream.wait_for_log(r"no shared cipher", offset)
        assert "TLS connection established" not in cbc_only_upstream.log_since(offset)


def test_upstream_tls_ciphers_are_used(cbc_only_upstream: Postfix) -> None:
    upstream = f"{cbc_only_upstream.host}:{cbc_only_upstream.port}"
    settings = {"mode": "opportunistic", "ciphers": "ECDHE-ECDSA-AES256-SHA384"}
    with Guard(upstream, upstream_tls=settings) as guard:
        offset = cbc_only_upstream.log_offset()
        assert guard_session(guard.port).startswith(b"220 ")
        line = established(cbc_only_upstream, offset)
        assert "TLSv1.2 with cipher ECDHE-ECDSA-AES256-SHA384" in line, line


# --------------------------------------------------------------------------- 2. no plaintext


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, str, float]:
    """Everything the server sends until it closes: (bytes, "fin"|"reset"|"open", seconds)."""
    started = time.monotonic()
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        return data, "reset", time.monotonic() - started
    except TimeoutError:
        return data, "open", time.monotonic() - started
    return data, "fin", time.monotonic() - started


@pytest.mark.parametrize("listener", LISTENERS)
def test_a_stalled_handshake_is_closed_without_a_byte(listener: str, ecdsa_guard: TLSGuard) -> None:
    """STARTTLS -> 220, then silence (or an implicit-TLS connection with no ClientHello)."""
    with open_for_tls(ecdsa_guard.targets[listener]) as sock:
        data, closed, seconds = read_until_closed(sock, HANDSHAKE_SECONDS + 10)
    assert closed != "open", f"still open after {seconds:.1f}s"
    assert data == b"", f"{data!r} after the 220" if listener == "starttls" else repr(data)
    assert seconds >= HANDSHAKE_SECONDS - 0.5  # closed by the deadline, not at once


@pytest.mark.parametrize("listener", LISTENERS)
@pytest.mark.parametrize(
    "talk", [b"EHLO client.test\r\n", b"QUIT\r\n", b"GET / HTTP/1.0\r\n\r\n"], ids=str
)
def test_plaintext_instead_of_a_client_hello_gets_no_plaintext_reply(
    listener: str, talk: bytes, ecdsa_guard: TLSGuard
) -> None:
    with open_for_tls(ecdsa_guard.targets[listener]) as sock:
        sock.sendall(talk)
        data, closed, seconds = read_until_closed(sock, HANDSHAKE_SECONDS + 10)
    assert closed != "open", f"still open after {seconds:.1f}s"
    assert looks_like_tls(data), f"not TLS records: {data!r}"  # b"" is fine too


# --------------------------------------------------------------------------- 3. alerts


@pytest.mark.parametrize("listener", LISTENERS)
def test_tls10_hello_gets_a_protocol_version_alert(listener: str, ecdsa_guard: TLSGuard) -> None:
    probe = handshake_probe(ecdsa_guard.targets[listener], tls10_context())
    assert not probe.ok, probe.describe()
    assert (FATAL, PROTOCOL_VERSION) in probe.alerts, probe.describe() + f" raw={probe.raw!r}"
    assert probe.eof is not None, "the connection stayed open after the alert"


@pytest.mark.parametrize("listener", LISTENERS)
@pytest.mark.parametrize("suite", REFUSED_TLS12)
def test_no_shared_suite_gets_a_handshake_failure_alert(
    listener: str, suite: str, ecdsa_guard: TLSGuard
) -> None:
    probe = handshake_probe(ecdsa_guard.targets[listener], refused_suite_context(suite))
    assert not probe.ok, probe.describe()
    assert (FATAL, HANDSHAKE_FAILURE) in probe.alerts, probe.describe() + f" raw={probe.raw!r}"
    assert probe.eof is not None, "the connection stayed open after the alert"


@pytest.mark.parametrize("listener", LISTENERS)
@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
def test_close_notify_after_quit(listener: str, version: str, ecdsa_guard: TLSGuard) -> None:
    probe = close_probe(ecdsa_guard.targets[listener], ctx(version))
    assert probe.reply.startswith(b"221 "), probe
    assert probe.outcome == "close_notify", probe
    assert probe.version == version


# --------------------------------------------------------------------------- 4. resumption


def worker_of_client(guard: Guard, port: int, timeout: float = 15) -> str:
    """The worker that served client ``port`` (from its ``event=disconnect`` line)."""
    pattern = re.compile(rf"event=disconnect .*client=127\.0\.0\.1:{port} .*worker=(\d+)")
    deadline = time.monotonic() + timeout
    while (match := pattern.search(guard.log())) is None:
        assert time.monotonic() < deadline, f"no disconnect line for client port {port}"
        time.sleep(0.02)
    return match.group(1)


@pytest.mark.parametrize("listener", LISTENERS)
@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
def test_reconnecting_clients_resume_whichever_worker_accepts(
    listener: str, version: str, two_workers: TLSGuard
) -> None:
    """First a full handshake with each worker (which worker accepts is up to the kernel:
    connect, six at a time, until both have); then ``count`` sessions, each offering, in
    turn, the latest session that worker 0 and worker 1 handed out.  Whichever worker
    accepts, the session must resume: about half of them on the worker that did not issue
    it."""
    target, guard, context = two_workers.targets[listener], two_workers.guard, ctx(version)
    latest: dict[str, ssl.SSLSession] = {}
    with ThreadPoolExecutor(max_workers=6) as pool:
        for _ in range(10):  # concurrent connections: both workers accept some
            for record, session in pool.map(lambda _: one_session(target, context), range(6)):
                if session is not None:
                    latest[worker_of_client(guard, record.local_port)] = session
            if len(latest) == 2:
                break
    assert set(latest) == {"0", "1"}, f"60 connections, all served by worker(s) {set(latest)}"
    count, reused, cross, rows = 20, 0, 0, []
    for i in range(count):
        issuer = ("0", "1")[i % 2]
        record, session = one_session(target, context, latest[issuer])
        worker = worker_of_client(guard, record.local_port)
        assert record.version == version
        reused += record.reused
        cross += record.reused and worker != issuer
        rows.append(f"issued by worker {issuer}, served by {worker}: reused={record.reused}")
        if session is not None:
            latest[worker] = session
    report = f"{reused}/{count} resumed, {cross} on the other worker:\n" + "\n".join(rows)
    print(report)
    assert reused >= count - 2, report
    assert cross >= 3, report


@pytest.mark.parametrize("listener", LISTENERS)
def test_sslyze_resumption_with_two_workers(listener: str, two_workers: TLSGuard) -> None:
    summary = sslyze_scan(
        two_workers.targets[listener], ca_file=two_workers.certs.ca_pem, connections=1
    )
    print(summary.format())
    assert summary.error is None, summary.format()
    # TLS 1.2 tickets are what a farm of workers can share; session ids (a per-process
    # cache) are only recorded.
    assert summary.ticket_resumption == "FULLY_SUPPORTED", summary.format()


# --------------------------------------------------------------------------- 5. the metric


def client_closes_mid_handshake(target: Target, *, partial: bool) -> None:
    """Send a ClientHello (``partial``: its first half only), then close the connection."""
    context = ctx()
    sock = open_for_tls(target)
    wire = WireTLS(sock, context, server_hostname=target.server_name)
    with pytest.raises(ssl.SSLWantReadError):
        wire.obj.do_handshake()
    hello = wire.outgoing.read()
    try:
        if partial:
            sock.sendall(hello[: len(hello) // 2])
            time.sleep(0.2)
        else:
            sock.sendall(hello)
            sock.settimeout(10)
            assert sock.recv(65536)  # the server's flight: it is waiting for our answer
    finally:
        sock.close()


def stall(target: Target) -> None:
    with open_for_tls(target) as sock:
        data, closed, _ = read_until_closed(sock, HANDSHAKE_SECONDS + 10)
    assert data == b"" and closed != "open"


def failure_counts(guard: Guard) -> dict[tuple[str, str], float]:
    """Every (listener, reason) series of the failure counter; missing ones are left out."""
    counts = {}
    for line in guard.metrics().splitlines():
        if not line.startswith(FAILURES + "{"):
            continue
        series, _, value = line.rpartition(" ")
        labels = dict(re.findall(r'(\w+)="([^"]*)"', series))
        counts[(labels.get("listener", "?"), labels.get("reason", "?"))] = float(value)
    return counts


def wait_counts(
    guard: Guard, expected: dict[tuple[str, str], float], timeout: float = 10
) -> dict[tuple[str, str], float]:
    deadline = time.monotonic() + timeout
    while (counts := failure_counts(guard)) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return counts


CAUSES: dict[str, Callable[[Target], Any]] = {
    "protocol_version": lambda t: handshake_probe(t, tls10_context()),
    "no_shared_cipher": lambda t: handshake_probe(
        t, refused_suite_context("ECDHE-ECDSA-AES128-SHA256")
    ),
    "client_closed (partial hello)": lambda t: client_closes_mid_handshake(t, partial=True),
    "client_closed (after server flight)": lambda t: client_closes_mid_handshake(t, partial=False),
    "timeout": stall,
}


@pytest.mark.parametrize("listener", LISTENERS)
def test_handshake_failures_are_counted_by_listener_and_reason(
    listener: str, fresh_guard: TLSGuard
) -> None:
    guard = fresh_guard.guard
    expected = {(kind, reason): 0.0 for kind in LISTENERS for reason in REASONS}
    counts = failure_counts(guard)
    assert counts == expected, f"every {FAILURES} series at 0 from the start; got {counts}"
    for cause, provoke in CAUSES.items():
        provoke(fresh_guard.targets[listener])
        reason = cause.split(" ")[0]
        expected[(listener, reason)] += 1
        counts = wait_counts(guard, expected)
        assert counts == expected, (cause, {k: v for k, v in counts.items() if v})
    # A handshake that succeeds counts nothing.
    assert handshake_probe(fresh_guard.targets[listener], ctx()).ok
    assert wait_counts(guard, expected, timeout=1) == expected


# --------------------------------------------------------------------------- records only


@pytest.mark.parametrize("listener", LISTENERS)
def test_sslyze_modern_profile_recorded(listener: str, ecdsa_guard: TLSGuard) -> None:
    """Mozilla's "modern" (TLS 1.3 only) is not the goal: print the verdict, assert nothing."""
    summary = ecdsa_guard.scan(listener, profile="modern")
    print(f"RECORD modern profile, {listener}: compliant={summary.compliant}")
    for rule, text in sorted(summary.issues.items()):
        print(f"RECORD   {rule}: {text}")


def test_alert_descriptions_are_readable() -> None:
    """The helper that names alerts in failure messages (a typo there hides a failure)."""
    assert (
        describe_alerts([(2, 70), (1, 0)]) == "fatal protocol_version(70), warning close_notify(0)"
    )


def test_postfix_side_by_side(tmp_path: Path) -> None:
    """The table for the notes: smtpguard (2 workers) and Postfix's own STARTTLS, same probes
    (tls_compare.py).  Recorded; only checks that every probe produced a measurement."""
    from tls_compare import compare, markdown

    columns, table = compare(tmp_path)
    print(markdown(columns, table))
    broken = {
        (row, column): text
        for row, cells in table.items()
        for column, text in cells.items()
        if text.startswith(("probe error", "no verdict"))
    }
    assert broken == {}
