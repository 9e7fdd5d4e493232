"""TLS scanners and wire probes for a live SMTP listener (STARTTLS or implicit TLS).

- :func:`sslyze_scan`: sslyze's Python API against ``host:port`` (``--starttls smtp`` when the
  target is a STARTTLS port) with the scan commands of a Mozilla profile (``intermediate`` by
  default) plus session resumption; returns a :class:`ScanSummary`: protocol versions, the
  accepted cipher suites per version, the groups, the Mozilla verdict with its issues, and the
  resumption results.  Equivalent to ``python3 -m sslyze --starttls smtp
  --mozilla_config=intermediate --resum --certinfo_ca_file CA host:port``.
- :class:`WireTLS`: a TLS client over a plain socket through memory BIOs, keeping every byte
  the server sent, so alerts (``15 03 0x 00 02 level description``) are read off the wire
  rather than guessed from the client's error text; :func:`handshake_probe`,
  :func:`close_probe` and :func:`resumption_probe` are built on it.
- :func:`openssl_group_probe`: ``openssl s_client -groups G`` (sslyze probes groups with the
  highest version only; this checks TLS 1.2 too).

Command line (prints the summary, or JSON with ``--json``)::

    python3 tests/e2e/tls_scan.py 127.0.0.1:2525 --starttls [--profile modern] [--ca-file CA]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import socket
import ssl
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: TLS alert descriptions (RFC 8446 6, RFC 5246 7.2), for messages.
ALERTS = {
    0: "close_notify",
    10: "unexpected_message",
    20: "bad_record_mac",
    22: "record_overflow",
    40: "handshake_failure",
    42: "bad_certificate",
    47: "illegal_parameter",
    50: "decode_error",
    51: "decrypt_error",
    70: "protocol_version",
    71: "insufficient_security",
    80: "internal_error",
    86: "inappropriate_fallback",
    90: "user_canceled",
    109: "missing_extension",
    110: "unsupported_extension",
    112: "unrecognized_name",
    120: "no_application_protocol",
}

PROTOCOL_VERSION = 70
HANDSHAKE_FAILURE = 40
FATAL = 2

#: The ``tls_*_cipher_suites`` result fields of sslyze, with Mozilla's version names.
_VERSIONS = (
    ("ssl_2_0_cipher_suites", "SSLv2"),
    ("ssl_3_0_cipher_suites", "SSLv3"),
    ("tls_1_0_cipher_suites", "TLSv1"),
    ("tls_1_1_cipher_suites", "TLSv1.1"),
    ("tls_1_2_cipher_suites", "TLSv1.2"),
    ("tls_1_3_cipher_suites", "TLSv1.3"),
)


@dataclass(frozen=True)
class Target:
    """An SMTP listener: ``starttls`` (plaintext greeting, then STARTTLS) or implicit TLS."""

    host: str
    port: int
    starttls: bool
    server_name: str = "localhost"  # SNI, and what sslyze calls the host (resolved to host)
    ehlo_name: str = "scanner.test"

    def __str__(self) -> str:
        return f"{self.host}:{self.port} ({'STARTTLS' if self.starttls else 'implicit TLS'})"


# --------------------------------------------------------------------------- certificates


def make_scan_certs(
    directory: str | Path,
    hostnames: tuple[str, ...] = ("localhost", "mx.test"),
    *,
    valid_days: int = 90,
    rsa: bool = False,
) -> Any:
    """A CA and a server certificate that pass sslyze's strict path validation (cryptography's
    web-PKI verifier) when the CA is given as ``ca_file``: trustme's leaves do not (their
    subjectAltName is critical beside a non-empty subject).  ECDSA P-256 (or RSA 2048), a
    ``valid_days`` lifetime (Mozilla intermediate: at most 366).  Returns a
    :class:`peers_tls.Certs` (without trustme objects), usable with ``tls_postfix``.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric import rsa as rsa_keys
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    from peers_tls import Certs

    def new_key() -> Any:
        if rsa:
            return rsa_keys.generate_private_key(public_exponent=65537, key_size=2048)
        return ec.generate_private_key(ec.SECP256R1())

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
    ca_key, key = new_key(), new_key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "smtpguard scan test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=valid_days + 30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    names: list[x509.GeneralName] = []
    for name in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=rsa,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_pem, cert_pem, key_pem = (
        folder / "ca.pem",
        folder / "server.crt.pem",
        folder / "server.key.pem",
    )
    chain_pem, combined_pem = folder / "server.chain.pem", folder / "server.combined.pem"
    ca_pem.write_bytes(ca_cert.public_bytes(pem))
    cert_pem.write_bytes(cert.public_bytes(pem))
    chain_pem.write_bytes(cert.public_bytes(pem) + ca_cert.public_bytes(pem))
    key_bytes = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    for path, data in ((key_pem, key_bytes), (combined_pem, key_bytes + chain_pem.read_bytes())):
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_bytes(data)
    return Certs(
        dir=folder,
        ca=None,
        server=None,
        hostnames=tuple(hostnames),
        ca_pem=ca_pem,
        cert_pem=cert_pem,
        key_pem=key_pem,
        chain_pem=chain_pem,
        combined_pem=combined_pem,
    )


# --------------------------------------------------------------------------- sslyze


@dataclass
class ScanSummary:
    """What sslyze found, in plain data (JSON-able with :func:`dataclasses.asdict`)."""

    target: str
    profile: str
    sslyze_version: str
    error: str | None = None
    protocols: list[str] = field(default_factory=list)
    #: accepted cipher suites per version, IANA names (``TLS_ECDHE_ECDSA_WITH_...``)
    suites: dict[str, list[str]] = field(default_factory=dict)
    #: the same, OpenSSL names (``ECDHE-ECDSA-AES128-GCM-SHA256``)
    openssl_suites: dict[str, list[str]] = field(default_factory=dict)
    #: groups accepted for the key exchange at the highest version (sslyze's elliptic_curves)
    groups: list[str] = field(default_factory=list)
    #: the groups the server picked when sslyze offered its defaults, per version
    negotiated_groups: dict[str, list[str]] = field(default_factory=dict)
    compliant: bool | None = None
    #: Mozilla checker issues, by rule (``ciphers``, ``tls_curves``, ``certificate_*`` ...)
    issues: dict[str, str] = field(default_factory=dict)
    fallback_scsv: bool | None = None
    extended_master_secret: bool | None = None
    secure_renegotiation: bool | None = None
    client_renegotiation_dos: bool | None = None
    compression: bool | None = None
    #: TLS 1.2 resumption: result enum names and successful/attempted counts
    session_id_resumption: str | None = None
    session_id_resumed: tuple[int, int] | None = None
    ticket_resumption: str | None = None
    ticket_resumed: tuple[int, int] | None = None
    seconds: float = 0.0

    @property
    def tls_issues(self) -> dict[str, str]:
        """The issues other than the certificate's (the test CA is in no public store)."""
        return {k: v for k, v in self.issues.items() if not _is_certificate_issue(k)}

    def format(self) -> str:
        lines = [f"sslyze {self.sslyze_version} against {self.target}, profile {self.profile}:"]
        if self.error:
            lines.append(f"  ERROR: {self.error}")
        lines.append(f"  protocols: {', '.join(self.protocols) or '-'}")
        for version, names in self.openssl_suites.items():
            lines.append(f"  {version} suites: {', '.join(names) or '-'}")
        lines.append(
            f"  groups ({self.protocols[-1] if self.protocols else '-'}): "
            f"{', '.join(self.groups) or '-'}"
        )
        verdict = {True: "compliant", False: "NOT compliant", None: "no verdict"}[self.compliant]
        lines.append(f"  mozilla {self.profile}: {verdict}")
        for rule, text in sorted(self.issues.items()):
            lines.append(f"    {rule}: {text}")
        lines.append(
            f"  resumption (TLS 1.2): session ids {self.session_id_resumption} "
            f"{self.session_id_resumed}, tickets {self.ticket_resumption} {self.ticket_resumed}"
        )
        lines.append(
            f"  fallback_scsv={self.fallback_scsv} ems={self.extended_master_secret} "
            f"secure_reneg={self.secure_renegotiation} "
            f"client_reneg_dos={self.client_renegotiation_dos} compression={self.compression}"
        )
        return "\n".join(lines)


def _is_certificate_issue(rule: str) -> bool:
    return rule.startswith("certificate") or rule in (
        "maximum_certificate_lifespan",
        "rsa_key_size",
    )


def sslyze_version() -> str:
    from sslyze.__version__ import __version__

    return str(__version__)


def sslyze_scan(
    target: Target,
    *,
    profile: str = "intermediate",
    ca_file: str | Path | None = None,
    resumption: bool = True,
    connections: int = 2,
) -> ScanSummary:
    """Run sslyze against ``target`` and check it against Mozilla's ``profile``.

    ``ca_file`` is trusted for the certificate checks (sslyze's ``--certinfo_ca_file``).
    ``connections`` bounds sslyze's concurrent connections (keep CPU use modest).
    A scan that could not connect, or lacks results, has ``error`` set and no verdict.
    """
    import sslyze
    from sslyze.mozilla_tls_profile.tls_config_checker import (
        SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
        MozillaTlsConfiguration,
        ServerNotCompliantWithTlsConfiguration,
        ServerScanResultIncomplete,
        TlsConfigurationEnum,
        check_server_against_tls_configuration,
    )

    started = time.monotonic()
    summary = ScanSummary(target=str(target), profile=profile, sslyze_version=sslyze_version())
    location = sslyze.ServerNetworkLocation(
        hostname=target.server_name, port=target.port, ip_address=target.host
    )
    network = sslyze.ServerNetworkConfiguration(
        tls_server_name_indication=target.server_name,
        tls_opportunistic_encryption=(
            sslyze.ProtocolWithOpportunisticTlsEnum.SMTP if target.starttls else None
        ),
        smtp_ehlo_hostname=target.ehlo_name if target.starttls else None,
        network_timeout=10,
        network_max_retries=2,
    )
    commands = set(SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER)
    if resumption:
        commands.add(sslyze.ScanCommand.SESSION_RESUMPTION)
    extra = sslyze.ScanCommandsExtraArguments(
        certificate_info=(
            sslyze.CertificateInfoExtraArgument(custom_ca_file=Path(ca_file)) if ca_file else None
        ),
    )
    request = sslyze.ServerScanRequest(
        server_location=location,
        network_configuration=network,
        scan_commands=commands,
        scan_commands_extra_arguments=extra,
    )
    scanner = sslyze.Scanner(
        per_server_concurrent_connections_limit=connections, concurrent_server_scans_limit=1
    )
    with warnings.catch_warnings():
        # sslyze's bundled trust stores hold a certificate cryptography warns about
        warnings.filterwarnings("ignore", message="Parsed a serial number which wasn't positive")
        scanner.queue_scans([request])
        [result] = list(scanner.get_results())
    summary.seconds = round(time.monotonic() - started, 1)
    if result.scan_status != sslyze.ServerScanStatusEnum.COMPLETED or result.scan_result is None:
        error = result.connectivity_error_trace
        summary.error = f"{result.connectivity_status.name}: {error and str(error)[-300:]}"
        return summary
    attempts = result.scan_result
    failed = []
    for name, version in _VERSIONS:
        attempt = getattr(attempts, name)
        if attempt.result is None:
            failed.append(f"{name}: {attempt.status.name} {attempt.error_reason}")
            continue
        if not attempt.result.is_tls_version_supported:
            continue
        summary.protocols.append(version)
        accepted = attempt.result.accepted_cipher_suites
        summary.suites[version] = sorted(s.cipher_suite.name for s in accepted)
        summary.openssl_suites[version] = sorted(s.cipher_suite.openssl_name for s in accepted)
        curves = sorted(
            {
                str(getattr(s.ephemeral_key, "curve_name", None))
                for s in accepted
                if s.ephemeral_key is not None
            }
        )
        summary.negotiated_groups[version] = curves
    curves_result = attempts.elliptic_curves.result
    if curves_result is not None and curves_result.supported_curves:
        summary.groups = sorted(c.name for c in curves_result.supported_curves)
    if (r := attempts.tls_fallback_scsv.result) is not None:
        summary.fallback_scsv = r.supports_fallback_scsv
    if (r := attempts.tls_extended_master_secret.result) is not None:
        summary.extended_master_secret = r.supports_ems_extension
    if (r := attempts.session_renegotiation.result) is not None:
        summary.secure_renegotiation = r.supports_secure_renegotiation
        summary.client_renegotiation_dos = r.is_vulnerable_to_client_renegotiation_dos
    if (r := attempts.tls_compression.result) is not None:
        summary.compression = r.supports_compression
    if resumption:
        res = attempts.session_resumption.result
        if res is None:
            failed.append(f"session_resumption: {attempts.session_resumption.error_reason}")
        else:
            summary.session_id_resumption = res.session_id_resumption_result.name
            summary.session_id_resumed = (
                res.session_id_successful_resumptions_count,
                res.session_id_attempted_resumptions_count,
            )
            summary.ticket_resumption = res.tls_ticket_resumption_result.name
            summary.ticket_resumed = (
                res.tls_ticket_successful_resumptions_count,
                res.tls_ticket_attempted_resumptions_count,
            )
    mozilla = MozillaTlsConfiguration.get(TlsConfigurationEnum(profile))
    try:
        check_server_against_tls_configuration(result, mozilla)
        summary.compliant = True
    except ServerNotCompliantWithTlsConfiguration as exc:
        summary.compliant = False
        summary.issues = dict(exc.issues)
    except ServerScanResultIncomplete as exc:
        failed.append(f"mozilla checker: {exc}")
    if failed:
        summary.error = "; ".join(failed)
    return summary


# --------------------------------------------------------------------------- wire probes


class ProbeError(AssertionError):
    """The plaintext SMTP part of a probe went wrong (not what the probe measures)."""


def _read_reply(sock: socket.socket, buf: bytearray) -> bytes:
    """One SMTP reply (all its lines) from a plain socket; what follows stays in ``buf``."""
    while True:
        end = 0
        while (nl := buf.find(b"\n", end)) >= 0:
            line = bytes(buf[end : nl + 1])
            end = nl + 1
            if line[3:4] != b"-":
                reply = bytes(buf[:end])
                del buf[:end]
                return reply
        chunk = sock.recv(65536)
        if not chunk:
            raise ProbeError(f"connection closed; got {bytes(buf)!r}")
        buf += chunk


def plain_to_starttls(target: Target, timeout: float = 15) -> socket.socket:
    """Connect, read the greeting, EHLO, STARTTLS; returns the socket right after the 220.

    Raises :class:`ProbeError` if STARTTLS is not answered 220 or if anything follows the
    220 in the same read (a server must send nothing more in plaintext).
    """
    sock = socket.create_connection((target.host, target.port), timeout=timeout)
    try:
        buf = bytearray()
        greeting = _read_reply(sock, buf)
        if not greeting.startswith(b"220"):
            raise ProbeError(f"greeting {greeting!r}")
        sock.sendall(f"EHLO {target.ehlo_name}\r\n".encode())
        ehlo = _read_reply(sock, buf)
        if b"STARTTLS" not in ehlo.upper():
            raise ProbeError(f"no STARTTLS offered: {ehlo!r}")
        sock.sendall(b"STARTTLS\r\n")
        reply = _read_reply(sock, buf)
        if not reply.startswith(b"220"):
            raise ProbeError(f"STARTTLS answered {reply!r}")
        if buf:
            raise ProbeError(f"plaintext after the 220: {bytes(buf)!r}")
        return sock
    except BaseException:
        sock.close()
        raise


def open_for_tls(target: Target, timeout: float = 15) -> socket.socket:
    """A socket where the next byte the client sends is its ClientHello."""
    if target.starttls:
        return plain_to_starttls(target, timeout)
    return socket.create_connection((target.host, target.port), timeout=timeout)


def tls_records(raw: bytes) -> list[tuple[int, int, bytes]]:
    """TLS records in ``raw``: (content type, record version, payload); a torn tail is left."""
    records = []
    i = 0
    while i + 5 <= len(raw):
        ctype, version, length = raw[i], int.from_bytes(raw[i + 1 : i + 3]), raw[i + 3 : i + 5]
        size = int.from_bytes(length)
        if i + 5 + size > len(raw):
            break
        records.append((ctype, version, raw[i + 5 : i + 5 + size]))
        i += 5 + size
    return records


def plaintext_alerts(raw: bytes) -> list[tuple[int, int]]:
    """(level, description) of each unencrypted alert record in ``raw``."""
    return [(p[0], p[1]) for t, _, p in tls_records(raw) if t == 21 and len(p) == 2]


def looks_like_tls(raw: bytes) -> bool:
    """``raw`` is whole TLS records (content types 20-23, version 3.x), nothing else."""
    records = tls_records(raw)
    used = sum(5 + len(p) for _, _, p in records)
    return used == len(raw) and all(20 <= t <= 23 and v >> 8 == 3 for t, v, _ in records)


def describe_alerts(alerts: list[tuple[int, int]]) -> str:
    if not alerts:
        return "none"
    return ", ".join(
        f"{'fatal' if lv == 2 else 'warning'} {ALERTS.get(d, d)}({d})" for lv, d in alerts
    )


class WireTLS:
    """A TLS client on ``sock`` through memory BIOs; :attr:`raw` keeps every byte received.

    :attr:`eof` is ``"fin"`` or ``"reset"`` once the server closed its side.
    """

    def __init__(
        self,
        sock: socket.socket,
        context: ssl.SSLContext,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> None:
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(
            self.incoming, self.outgoing, server_hostname=server_hostname, session=session
        )
        self.raw = bytearray()
        self.eof: str | None = None
        self._plain = bytearray()

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data and self.eof is None:
            with contextlib.suppress(OSError):
                self.sock.sendall(data)

    def _fill(self, deadline: float) -> None:
        if self.eof is not None:
            raise ssl.SSLEOFError("server already closed")  # nothing more will come
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk, self.eof = b"", "reset"
        except TimeoutError:
            raise TimeoutError("the server sent nothing more before the deadline") from None
        if not chunk:
            self.eof = self.eof or "fin"
            self.incoming.write_eof()
            return
        self.raw += chunk
        self.incoming.write(chunk)

    def _retry(self, fn: Callable[[], Any], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                result = fn()
            except ssl.SSLWantReadError:
                self._flush()
                self._fill(deadline)
                continue
            except ssl.SSLError:
                self._flush()  # our own alert, if any
                raise
            self._flush()
            return result

    def handshake(self, timeout: float = 15) -> None:
        self._retry(self.obj.do_handshake, timeout)

    def send(self, data: bytes) -> None:
        self.obj.write(data)
        self._flush()

    def read_reply(self, timeout: float = 15) -> bytes:
        """One SMTP reply over TLS."""
        while True:
            end = 0
            while (nl := self._plain.find(b"\n", end)) >= 0:
                line = bytes(self._plain[end : nl + 1])
                end = nl + 1
                if line[3:4] != b"-":
                    reply = bytes(self._plain[:end])
                    del self._plain[:end]
                    return reply
            self._plain += self._retry(lambda: self.obj.read(65536), timeout)

    def read_close(self, timeout: float = 15) -> str:
        """Read until the server ends the TLS session: ``close_notify`` when it sent one,
        ``eof_without_close_notify`` (TCP closed without it), ``data:...`` if it sent more
        application data, ``ssl_error:...`` otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                data = self.obj.read(65536)
            except ssl.SSLWantReadError:
                try:
                    self._fill(deadline)
                except TimeoutError:
                    return "timeout"
                continue
            except ssl.SSLZeroReturnError:
                return "close_notify"
            except ssl.SSLEOFError:
                return "eof_without_close_notify"
            except ssl.SSLError as exc:
                return f"ssl_error:{exc.reason or exc}"
            if data:
                return f"data:{data[:80]!r}"
            return "close_notify"  # read() returned b"": a clean close

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def client_context(
    *,
    min_version: ssl.TLSVersion | None = None,
    max_version: ssl.TLSVersion | None = None,
    ciphers: str | None = None,
) -> ssl.SSLContext:
    """An unverifying client context (the probes look at the server's TLS, not its name).

    TLS 1.0/1.1 and SHA-1 suites need ``@SECLEVEL=0`` with OpenSSL 3: add it to ``ciphers``.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSVersion.TLSv1
        if min_version is not None:
            context.minimum_version = min_version
        if max_version is not None:
            context.maximum_version = max_version
    if ciphers is not None:
        context.set_ciphers(ciphers)
    return context


@dataclass
class HandshakeProbe:
    """One handshake attempt and what the server put on the wire."""

    ok: bool
    version: str | None
    cipher: str | None
    error: str | None
    alerts: list[tuple[int, int]]
    eof: str | None
    raw: bytes

    def describe(self) -> str:
        if self.ok:
            return f"accepted: {self.version} {self.cipher}"
        return f"refused ({self.error}); alerts on the wire: {describe_alerts(self.alerts)}; " + (
            f"closed: {self.eof}" if self.eof else "still open"
        )


def handshake_probe(
    target: Target, context: ssl.SSLContext, *, timeout: float = 15, quit_after: bool = True
) -> HandshakeProbe:
    """Try one handshake with ``context``; on failure, wait (up to ``timeout``) for the close."""
    sock = open_for_tls(target, timeout)
    wire = WireTLS(sock, context, server_hostname=target.server_name)
    try:
        try:
            wire.handshake(timeout)
        except (ssl.SSLError, TimeoutError) as exc:
            error = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            if wire.eof is None:
                # The server may still be sending (or about to close): see what comes.
                with contextlib.suppress(ssl.SSLError, TimeoutError, OSError):
                    deadline = time.monotonic() + min(timeout, 5)
                    while wire.eof is None:
                        wire._fill(deadline)
            return HandshakeProbe(
                False,
                None,
                None,
                error,
                plaintext_alerts(bytes(wire.raw)),
                wire.eof,
                bytes(wire.raw),
            )
        cipher = wire.obj.cipher()
        probe = HandshakeProbe(
            True,
            wire.obj.version(),
            cipher[0] if cipher else None,
            None,
            [],
            None,
            bytes(wire.raw),
        )
        if quit_after:
            with contextlib.suppress(ssl.SSLError, TimeoutError, OSError, ProbeError):
                if not target.starttls:
                    wire.read_reply(timeout)
                wire.send(b"QUIT\r\n")
                wire.read_reply(timeout)
        return probe
    finally:
        wire.close()


@dataclass
class CloseProbe:
    version: str | None
    reply: bytes
    outcome: str  # close_notify | eof_without_close_notify | timeout | data:... | ssl_error:...
    eof: str | None


def close_probe(target: Target, context: ssl.SSLContext, *, timeout: float = 15) -> CloseProbe:
    """TLS, then ``QUIT``: after the ``221``, does the server send close_notify?"""
    sock = open_for_tls(target, timeout)
    wire = WireTLS(sock, context, server_hostname=target.server_name)
    try:
        wire.handshake(timeout)
        version = wire.obj.version()
        if not target.starttls:
            greeting = wire.read_reply(timeout)
            if not greeting.startswith(b"220"):
                raise ProbeError(f"greeting over TLS: {greeting!r}")
        wire.send(b"QUIT\r\n")
        reply = wire.read_reply(timeout)
        outcome = wire.read_close(timeout)
        return CloseProbe(version, reply, outcome, wire.eof)
    finally:
        wire.close()


@dataclass
class ResumptionRecord:
    local_port: int
    version: str | None
    reused: bool
    offered: bytes | None  # id of the session offered (None on the first connection)
    got: bytes | None  # id of the session the connection ended with


def one_session(
    target: Target,
    context: ssl.SSLContext,
    session: ssl.SSLSession | None = None,
    *,
    timeout: float = 15,
) -> tuple[ResumptionRecord, ssl.SSLSession | None]:
    """One session offering ``session``: TLS, EHLO (which also brings TLS 1.3 tickets),
    QUIT; returns what happened and the session to offer next time."""
    sock = open_for_tls(target, timeout)
    local_port = sock.getsockname()[1]
    wire = WireTLS(sock, context, server_hostname=target.server_name, session=session)
    try:
        wire.handshake(timeout)
        version, reused = wire.obj.version(), bool(wire.obj.session_reused)
        if not target.starttls:
            wire.read_reply(timeout)
        wire.send(f"EHLO {target.ehlo_name}\r\n".encode())
        wire.read_reply(timeout)
        wire.send(b"QUIT\r\n")
        wire.read_reply(timeout)
        with contextlib.suppress(ssl.SSLError, TimeoutError, OSError):
            wire.read_close(timeout)
        new = wire.obj.session
        record = ResumptionRecord(
            local_port,
            version,
            reused,
            session.id if session is not None else None,
            new.id if new is not None else None,
        )
        return record, new
    finally:
        wire.close()


def resumption_probe(
    target: Target, context: ssl.SSLContext, *, count: int = 20, timeout: float = 15
) -> list[ResumptionRecord]:
    """``count`` sessions in a row, each offering the session the previous one ended with."""
    records: list[ResumptionRecord] = []
    session: ssl.SSLSession | None = None
    for _ in range(count):
        record, new = one_session(target, context, session, timeout=timeout)
        records.append(record)
        session = new or session
    return records


# --------------------------------------------------------------------------- openssl s_client

#: openssl's ``-groups`` names for the groups the tests speak of
OPENSSL_GROUPS = {
    "X25519": "X25519",
    "P-256": "P-256",
    "P-384": "P-384",
    "P-521": "P-521",
    "X448": "X448",
    "ffdhe2048": "ffdhe2048",
}


@dataclass
class GroupProbe:
    accepted: bool
    temp_key: str | None  # ``Server Temp Key`` / ``Peer Temp Key`` line of s_client
    version: str | None
    output: str


def openssl_group_probe(
    target: Target, group: str, version: str, *, timeout: float = 20
) -> GroupProbe:
    """``openssl s_client -groups GROUP -tls1_2|-tls1_3``: is a handshake with only ``group``
    offered accepted, and with which key exchange?"""
    flag = {"TLSv1.2": "-tls1_2", "TLSv1.3": "-tls1_3"}[version]
    cmd = [
        "openssl",
        "s_client",
        "-connect",
        f"{target.host}:{target.port}",
        "-servername",
        target.server_name,
        flag,
        "-groups",
        OPENSSL_GROUPS.get(group, group),
        "-brief",
    ]
    if target.starttls:
        cmd += ["-starttls", "smtp", "-name", target.ehlo_name]
    done = subprocess.run(cmd, input=b"QUIT\r\n", capture_output=True, timeout=timeout, check=False)
    output = (done.stdout + done.stderr).decode(errors="replace")
    key = re.search(r"^(?:Server|Peer) Temp Key: (.+)$", output, re.MULTILINE)
    proto = re.search(r"^Protocol version: (\S+)", output, re.MULTILINE)
    accepted = done.returncode == 0 and proto is not None
    return GroupProbe(accepted, key and key.group(1).strip(), proto and proto.group(1), output)


# --------------------------------------------------------------------------- command line


def _parse_target(text: str, starttls: bool, server_name: str) -> Target:
    host, _, port = text.rpartition(":")
    return Target(host.strip("[]") or "127.0.0.1", int(port), starttls, server_name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="host:port")
    parser.add_argument("--starttls", action="store_true", help="STARTTLS (else implicit TLS)")
    parser.add_argument("--profile", default="intermediate", choices=["intermediate", "modern"])
    parser.add_argument("--ca-file", help="trust this CA for the certificate checks")
    parser.add_argument("--sni", default="localhost")
    parser.add_argument("--no-resumption", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    target = _parse_target(args.target, args.starttls, args.sni)
    summary = sslyze_scan(
        target, profile=args.profile, ca_file=args.ca_file, resumption=not args.no_resumption
    )
    if args.json:
        print(json.dumps(dataclasses.asdict(summary), indent=2))
    else:
        print(summary.format())
    return 0 if summary.compliant else 1


if __name__ == "__main__":
    sys.exit(main())
