"""smtpguard's TLS beside Postfix's own, measured the same way (sslyze and wire probes).

One private Postfix offering STARTTLS with Debian's/Postfix's default TLS settings (only the
certificate, ``smtpd_tls_security_level = may`` and, to keep the stall probe short,
``smtpd_starttls_timeout = 2s``), and smtpguard (its defaults, ``workers: 2``, a STARTTLS and
an implicit-TLS listener, handshake deadline 2 s) in front of that same Postfix, both with one
RSA 2048 certificate (so the TLS 1.2 key-exchange groups can be probed one by one).

Each column gets: sslyze (Mozilla intermediate and modern verdicts, protocols, suites, groups,
TLS 1.2 resumption), ``openssl s_client -groups`` per group for TLS 1.2 and 1.3, 20 reconnects
offering the previous session (TLS 1.2 and 1.3), and wire probes: alerts for a TLS 1.0 hello and
for suites outside the profile, close_notify after QUIT, what a client that stalls or talks
plaintext after ``220 Ready to start TLS`` receives.

    sudo python3 tests/e2e/tls_compare.py [--json FILE]    # prints a Markdown table

``test_tls_scanners.py::test_postfix_side_by_side`` runs the same and prints the table.
"""

from __future__ import annotations

import argparse
import json
import re
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from guard import Guard  # noqa: E402
from peers import free_port  # noqa: E402
from peers_tls import Certs, tls_postfix  # noqa: E402
from tls_scan import (  # noqa: E402
    ScanSummary,
    Target,
    client_context,
    close_probe,
    describe_alerts,
    handshake_probe,
    looks_like_tls,
    make_scan_certs,
    open_for_tls,
    openssl_group_probe,
    plaintext_alerts,
    resumption_probe,
    sslyze_scan,
    sslyze_version,
)

STALL_SECONDS = 2
GROUPS = ("X25519", "P-256", "P-384", "X448", "P-521")
#: TLS 1.2 suites offered alone (RSA certificate): outside Mozilla intermediate
OUTSIDE_PROFILE = ("AES128-SHA", "ECDHE-RSA-AES128-SHA256", "ECDHE-RSA-AES256-SHA")
VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def _try(fn: Callable[[], str]) -> str:
    try:
        return fn()
    except Exception as exc:  # a probe that breaks is a finding, not a crash of the table
        return f"probe error: {type(exc).__name__}: {str(exc)[:120]}"


def _verdict(summary: ScanSummary) -> str:
    if summary.error:
        return f"no verdict ({summary.error[:100]})"
    if summary.compliant:
        return "compliant"
    issues = []
    for rule, text in sorted(summary.issues.items()):
        listed = re.search(r"\{([^}]*)\}", text)  # the first set: what is there too much
        names = sorted(re.findall(r"'([^']+)'", listed.group(1))) if listed else []
        if rule.startswith("certificate"):
            names = []  # "Deployed ... are {...}, should have one of {...}": keep the text
        if rule == "ciphers" and len(names) > 6:
            issues.append(f"ciphers: {len(names)} suites outside the profile")
        elif names:
            issues.append(f"{rule}: {', '.join(names)}")
        else:
            issues.append(f"{rule}: {text[:110]}")
    return "NOT compliant: " + "; ".join(issues)


#: families of TLS 1.2 suites (OpenSSL names), for a short cell
FAMILIES = (
    ("anonymous", re.compile(r"^(ADH|AECDH)-")),
    ("ECDHE AEAD", re.compile(r"^ECDHE-(ECDSA|RSA)-(AES\d+-GCM|CHACHA20-POLY1305)")),
    ("ECDHE other", re.compile(r"^ECDHE-")),
    ("DHE", re.compile(r"^DHE-")),
    ("RSA key exchange", re.compile(r"^(AES|CAMELLIA|ARIA|DES|RC4|SEED|IDEA)")),
)


def _suites(names: list[str]) -> str:
    if len(names) <= 6:
        return ", ".join(names) or "-"
    counts: dict[str, int] = {}
    for name in names:
        family = next((f for f, rx in FAMILIES if rx.match(name)), "other")
        counts[family] = counts.get(family, 0) + 1
    cbc = sum(1 for n in names if "GCM" not in n and "CHACHA" not in n and "CCM" not in n)
    parts = ", ".join(f"{family} {n}" for family, n in counts.items())
    return f"{len(names)} suites ({parts}; {cbc} CBC)"


def _stall(target: Target) -> str:
    with open_for_tls(target) as sock:
        sock.settimeout(STALL_SECONDS + 15)
        started, data, how = time.monotonic(), b"", "closed"
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            how = "reset"
        except TimeoutError:
            how = "still open"
        seconds = time.monotonic() - started
    shown = "no byte" if not data else repr(data[:60])
    return f"{shown}, {how} after {seconds:.1f}s"


def _plaintext(target: Target) -> str:
    with open_for_tls(target) as sock:
        sock.sendall(b"EHLO client.test\r\n")
        sock.settimeout(STALL_SECONDS + 15)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    if not data:
        return "no byte, closed"
    if looks_like_tls(data):
        return f"TLS only: alerts {describe_alerts(plaintext_alerts(data))}"
    return f"PLAINTEXT: {data[:60]!r}"


def _alert(target: Target, context: ssl.SSLContext) -> str:
    probe = handshake_probe(target, context)
    if probe.ok:
        return f"accepted ({probe.version} {probe.cipher})"
    return f"alert {describe_alerts(probe.alerts)}" if probe.alerts else f"no alert ({probe.eof})"


def _groups(target: Target, version: str) -> str:
    accepted = [g for g in GROUPS if openssl_group_probe(target, g, version).accepted]
    return ", ".join(accepted) or "none"


def _resume(target: Target, version: str) -> str:
    tls = VERSIONS[version]
    records = resumption_probe(target, client_context(min_version=tls, max_version=tls))
    return f"{sum(r.reused for r in records)}/{len(records)} resumed"


def measure(target: Target, ca_file: Path) -> dict[str, str]:
    """Every row of the table for one listener."""
    intermediate = sslyze_scan(target, ca_file=ca_file, connections=1)
    modern = sslyze_scan(target, profile="modern", ca_file=ca_file, resumption=False)
    tls10 = client_context(
        min_version=ssl.TLSVersion.TLSv1,
        max_version=ssl.TLSVersion.TLSv1,
        ciphers="DEFAULT:@SECLEVEL=0",
    )
    rows = {
        "protocols (sslyze)": ", ".join(intermediate.protocols) or "-",
        "TLS 1.2 suites": _suites(intermediate.openssl_suites.get("TLSv1.2", [])),
        "TLS 1.3 suites": ", ".join(intermediate.openssl_suites.get("TLSv1.3", [])) or "-",
        "groups (sslyze, highest version)": ", ".join(intermediate.groups) or "-",
        "groups alone, TLS 1.2 (s_client)": _try(lambda: _groups(target, "TLSv1.2")),
        "groups alone, TLS 1.3 (s_client)": _try(lambda: _groups(target, "TLSv1.3")),
        "Mozilla intermediate": _verdict(intermediate),
        "Mozilla modern (recorded)": _verdict(modern),
        "fallback SCSV / EMS / secure reneg / compression": (
            f"{intermediate.fallback_scsv} / {intermediate.extended_master_secret} / "
            f"{intermediate.secure_renegotiation} / {intermediate.compression}"
        ),
        "TLS 1.2 resumption (sslyze): session ids": (
            f"{intermediate.session_id_resumption} {intermediate.session_id_resumed}"
        ),
        "TLS 1.2 resumption (sslyze): tickets": (
            f"{intermediate.ticket_resumption} {intermediate.ticket_resumed}"
        ),
        "20 reconnects, TLS 1.2": _try(lambda: _resume(target, "TLSv1.2")),
        "20 reconnects, TLS 1.3": _try(lambda: _resume(target, "TLSv1.3")),
        "TLS 1.0 hello": _try(lambda: _alert(target, tls10)),
    }
    for suite in OUTSIDE_PROFILE:
        context = client_context(max_version=ssl.TLSVersion.TLSv1_2, ciphers=f"{suite}:@SECLEVEL=0")
        rows[f"TLS 1.2 offering only {suite}"] = _try(
            lambda context=context: _alert(target, context)  # type: ignore[misc]
        )
    for version, tls in VERSIONS.items():
        context = client_context(min_version=tls, max_version=tls)
        rows[f"after QUIT/221 ({version})"] = _try(
            lambda context=context: close_probe(target, context).outcome  # type: ignore[misc]
        )
    # STARTTLS: after "220 Ready to start TLS"; implicit TLS: right after connecting
    rows["client silent instead of a ClientHello"] = _try(lambda: _stall(target))
    rows["plaintext EHLO instead of a ClientHello"] = _try(lambda: _plaintext(target))
    return rows


def compare(workdir: Path) -> tuple[list[str], dict[str, dict[str, str]]]:
    """Start Postfix and smtpguard, measure; returns (column names, {row: {column: cell}})."""
    certs: Certs = make_scan_certs(workdir / "certs", rsa=True)
    postfix = tls_postfix(certs, extra_main_cf={"smtpd_starttls_timeout": f"{STALL_SECONDS}s"})
    try:
        ports = {"starttls": free_port(), "implicit": free_port()}
        guard = Guard(
            f"{postfix.host}:{postfix.port}",
            listen=[
                f"127.0.0.1:{ports['starttls']}",
                {"address": f"127.0.0.1:{ports['implicit']}", "tls": "implicit"},
            ],
            tls={"certificate": str(certs.cert_pem), "key": str(certs.key_pem)},
            timeouts={
                "client_command_seconds": STALL_SECONDS,
                "connect_seconds": STALL_SECONDS,
            },
            workers=2,
        )
        guard.port = ports["starttls"]
        with guard:
            time.sleep(1)  # both workers listening
            targets = {
                "smtpguard STARTTLS (2 workers)": Target("127.0.0.1", ports["starttls"], True),
                "smtpguard implicit TLS (2 workers)": Target("127.0.0.1", ports["implicit"], False),
                "Postfix 3.7 STARTTLS (defaults)": Target(postfix.host, postfix.port, True),
            }
            columns = list(targets)
            table: dict[str, dict[str, str]] = {}
            for column, target in targets.items():
                for row, cell in measure(target, certs.ca_pem).items():
                    table.setdefault(row, {})[column] = cell
            return columns, table
    finally:
        postfix.stop()


def markdown(columns: list[str], table: dict[str, dict[str, str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        f"sslyze {sslyze_version()}, {ssl.OPENSSL_VERSION}; RSA 2048 certificate on both sides",
        "",
        "| | " + " | ".join(columns) + " |",
        "| --- |" + " --- |" * len(columns),
    ]
    for row, cells in table.items():
        lines.append(f"| {row} | " + " | ".join(cell(cells.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the table as JSON to this file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="smtpguard-tls-compare-") as workdir:
        columns, table = compare(Path(workdir))
    print(markdown(columns, table))
    if args.json:
        Path(args.json).write_text(json.dumps({"columns": columns, "rows": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
