"""Real peers for the TLS / AUTH / client-identity end-to-end tests (builds on peers.py).

- :func:`make_certs`: a throw-away CA and a server certificate (trustme), as PEM files.
- :func:`tls_postfix`: a private Postfix offering STARTTLS with those certificates.
- :class:`SaslPostfix` / :func:`sasl_postfix`: a private Postfix offering AUTH PLAIN/LOGIN
  through Cyrus SASL with a private sasldb (no saslauthd, no extra daemon).
- :class:`HAProxy`: Debian's haproxy as a TCP proxy on loopback, optionally sending a PROXY
  header (v1 or v2) to its backend; :func:`proxy_postfix`: a Postfix expecting that header.
- :func:`xclient_postfix`: a Postfix that lets 127.0.0.0/8 override the client with XCLIENT.
- :class:`SMTPClient`: a small blocking raw-socket SMTP client (bind to a chosen source
  address, STARTTLS, XCLIENT, raw bytes) for what swaks cannot do.

Plain stdlib + trustme; a missing program raises peers.MissingProgramError (fail, never skip).
Every process started here is stopped by the caller's teardown, and at interpreter exit as a
last resort.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peers import (
    KEEP_ENV,
    MissingProgramError,
    PeerError,
    Postfix,
    _listening,
    find_program,
    free_port,
)

# A realm Cyrus SASL appends to bare user names (Postfix passes it as smtpd_sasl_local_domain).
DEFAULT_REALM = "smtpguard.test"
DEFAULT_HOSTNAMES = ("localhost", "127.0.0.1", "mx.test")

_live: set[HAProxy] = set()


@atexit.register
def _stop_all() -> None:
    for peer in list(_live):
        with contextlib.suppress(Exception):
            peer.stop()


def _keep_dirs() -> bool:
    return os.environ.get(KEEP_ENV, "") not in ("", "0")


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _wait_listening(host: str, port: int, timeout: float, alive: Any = None) -> None:
    """Wait until something listens on host:port, without connecting (a probe connection
    through a proxy would reach, and show up at, its backend); ``alive()`` False aborts."""
    deadline = time.monotonic() + timeout
    while not _listening(host, port):
        if alive is not None and not alive():
            raise PeerError(f"process exited before listening on {host}:{port}")
        if time.monotonic() > deadline:
            raise PeerError(f"nothing listening on {host}:{port} after {timeout}s")
        time.sleep(0.05)


# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Certs:
    """A CA and one server certificate, in memory (trustme objects) and as PEM files.

    ``cert_pem`` is the leaf alone; ``chain_pem`` the leaf then the CA; ``combined_pem`` the
    key, the leaf and the CA in one file (HAProxy's ``crt`` format).  The key file is 0600.
    """

    dir: Path
    ca: Any = field(repr=False)  # trustme.CA
    server: Any = field(repr=False)  # trustme.LeafCert
    hostnames: tuple[str, ...]
    ca_pem: Path
    cert_pem: Path
    key_pem: Path
    chain_pem: Path
    combined_pem: Path

    def client_context(self) -> ssl.SSLContext:
        """A client SSLContext trusting only this CA (hostname checking on)."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_pem))
        return context

    def server_context(self) -> ssl.SSLContext:
        """A server SSLContext presenting the server certificate (and the CA as chain)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(self.chain_pem), str(self.key_pem))
        return context


def make_certs(
    tmpdir: str | os.PathLike[str], hostnames: Iterable[str] = DEFAULT_HOSTNAMES
) -> Certs:
    """Create a CA and a server certificate for ``hostnames`` under ``tmpdir`` (PEM files).

    Postfix's smtpd loads its certificate and key while still root, so ``tmpdir`` may be a
    private (0700) folder such as pytest's ``tmp_path``.
    """
    try:
        import trustme
    except ImportError as exc:
        raise MissingProgramError(
            "the Python package 'trustme' is not installed: pip install trustme"
        ) from exc
    names = tuple(hostnames)
    directory = Path(tmpdir)
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="smtpguard test CA")
    server = ca.issue_cert(*names)
    ca_pem = directory / "ca.pem"
    cert_pem = directory / "server.crt.pem"
    key_pem = directory / "server.key.pem"
    chain_pem = directory / "server.chain.pem"
    combined_pem = directory / "server.combined.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    server.cert_chain_pems[0].write_to_path(str(cert_pem))
    chain_pem.write_bytes(
        b"".join(blob.bytes() for blob in server.cert_chain_pems) + ca.cert_pem.bytes()
    )
    for path, data in (
        (key_pem, server.private_key_pem.bytes()),
        (combined_pem, server.private_key_pem.bytes() + chain_pem.read_bytes()),
    ):
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_bytes(data)
    return Certs(
        dir=directory,
        ca=ca,
        server=server,
        hostnames=names,
        ca_pem=ca_pem,
        cert_pem=cert_pem,
        key_pem=key_pem,
        chain_pem=chain_pem,
        combined_pem=combined_pem,
    )


# --------------------------------------------------------------------------- Postfix flavours


def tls_main_cf(certs: Certs, *, level: str = "may") -> dict[str, str]:
    """main.cf settings offering STARTTLS with ``certs`` (``level``: may | encrypt | none).

    TLS sessions are logged (``Anonymous TLS connection established from ...``) and noted in
    the Received header (``(using TLSv1.3 with cipher ...)``).
    """
    return {
        "smtpd_tls_cert_file": str(certs.chain_pem),
        "smtpd_tls_key_file": str(certs.key_pem),
        "smtpd_tls_security_level": level,
        "smtpd_tls_loglevel": "1",
        "smtpd_tls_received_header": "yes",
        "smtpd_tls_session_cache_database": "",
    }


def tls_postfix(
    certs: Certs, *, level: str = "may", extra_main_cf: Mapping[str, str] | None = None, **kw: Any
) -> Postfix:
    """A started :class:`Postfix` offering STARTTLS with ``certs``; ``kw`` go to Postfix()."""
    settings = tls_main_cf(certs, level=level)
    settings.update(extra_main_cf or {})
    return Postfix(extra_main_cf=settings, **kw).start()


def proxy_main_cf() -> dict[str, str]:
    """main.cf settings making smtpd expect a PROXY header (v1 or v2) on every connection."""
    return {"smtpd_upstream_proxy_protocol": "haproxy", "smtpd_upstream_proxy_timeout": "5s"}


def proxy_postfix(*, extra_main_cf: Mapping[str, str] | None = None, **kw: Any) -> Postfix:
    """A started :class:`Postfix` with ``smtpd_upstream_proxy_protocol = haproxy``.

    Its ``connect from`` log line and Received header show the client address taken from the
    PROXY header.  A connection without a PROXY header is dropped after the timeout (5 s).
    """
    settings = proxy_main_cf()
    settings.update(extra_main_cf or {})
    return Postfix(extra_main_cf=settings, **kw).start()


def xclient_main_cf(hosts: str = "127.0.0.0/8") -> dict[str, str]:
    """main.cf settings letting ``hosts`` use XCLIENT (advertised in their EHLO reply)."""
    return {"smtpd_authorized_xclient_hosts": hosts}


def xclient_postfix(
    *, hosts: str = "127.0.0.0/8", extra_main_cf: Mapping[str, str] | None = None, **kw: Any
) -> Postfix:
    """A started :class:`Postfix` accepting XCLIENT from ``hosts``.

    After ``XCLIENT ADDR=192.0.2.7 PORT=4242`` (answered with a fresh ``220`` greeting; send
    EHLO again) the session is treated as coming from 192.0.2.7: access checks, the
    ``client=unknown[192.0.2.7]:4242`` and ``disconnect from`` log lines, and the Received
    header use it.  The ``connect from`` line still shows the real (loopback) peer.
    """
    settings = xclient_main_cf(hosts)
    settings.update(extra_main_cf or {})
    return Postfix(extra_main_cf=settings, **kw).start()


class SaslPostfix(Postfix):
    """A private Postfix offering AUTH through Cyrus SASL with a private sasldb2.

    No saslauthd or other daemon: smtpd reads the sasldb itself (``pwcheck_method: auxprop``,
    ``auxprop_plugin: sasldb``).  ``users`` maps bare user names to passwords, stored in
    ``realm`` (= ``smtpd_sasl_local_domain``, so clients authenticate as the bare name).
    Successful AUTH shows up as ``client=...:PORT, sasl_method=PLAIN,
    sasl_username=alice@smtpguard.test`` in the log, as ``(Authenticated sender:
    alice@smtpguard.test)`` and ``with ESMTPA`` in the Received header; a wrong password gets
    ``535 5.7.8 Error: authentication failed: authentication failure``.

    ``require_auth=True`` makes AUTH mandatory for relaying, even from 127.0.0.0/8 (RCPT
    without AUTH gets ``554 5.7.1 <rcpt>: Recipient address rejected: Access denied``).
    ``certs`` also offers STARTTLS (AUTH stays allowed without TLS: ``smtpd_tls_auth_only =
    no``).

    Debian's Postfix ignores ``cyrus_sasl_config_path``: it reads
    ``$config_directory/sasl/smtpd.conf`` (then ``/usr/lib/sasl/smtpd.conf``).  So the SASL
    files live in :attr:`sasl_dir` = ``<config_dir>/sasl`` (inside the instance's 0755 temp
    folder, since smtpd opens the sasldb as user postfix, after dropping root).
    """

    def __init__(
        self,
        users: Mapping[str, str],
        *,
        realm: str = DEFAULT_REALM,
        mechanisms: Iterable[str] = ("PLAIN", "LOGIN"),
        require_auth: bool = False,
        certs: Certs | None = None,
        extra_main_cf: Mapping[str, str] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.users = dict(users)
        self.realm = realm
        self.mechanisms = tuple(mechanisms)
        self.require_auth = require_auth
        self.certs = certs
        self._user_main_cf = dict(extra_main_cf or {})

    @property
    def sasl_dir(self) -> Path:
        return self.config_dir / "sasl"

    @property
    def sasldb_path(self) -> Path:
        return self.sasl_dir / "sasldb2"

    def sasl_main_cf(self) -> dict[str, str]:
        settings = {
            "smtpd_sasl_auth_enable": "yes",
            "smtpd_sasl_type": "cyrus",
            "smtpd_sasl_path": "smtpd",
            "cyrus_sasl_config_path": str(self.sasl_dir),  # for non-Debian builds
            "smtpd_sasl_local_domain": self.realm,
            "smtpd_sasl_security_options": "noanonymous",
            "smtpd_tls_auth_only": "no",
            "smtpd_sasl_authenticated_header": "yes",
            "broken_sasl_auth_clients": "no",
        }
        if self.require_auth:
            settings["smtpd_relay_restrictions"] = "permit_sasl_authenticated, reject"
        if self.certs is not None:
            settings.update(tls_main_cf(self.certs))
        return settings

    def main_cf(self) -> dict[str, str]:
        settings = super().main_cf()
        settings.update(self.sasl_main_cf())
        settings.update(self._user_main_cf)
        return settings

    def add_user(self, user: str, password: str) -> None:
        """Create or update ``user`` (in :attr:`realm`) in the sasldb; works while running."""
        result = subprocess.run(
            [_find_sasl_program("saslpasswd2"), "-p", "-c", "-f", str(self.sasldb_path)]
            + ["-u", self.realm, user],
            input=password,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if result.returncode != 0:
            raise PeerError(f"saslpasswd2 failed for {user!r}: {result.stderr.strip()}")
        shutil.chown(self.sasldb_path, user="postfix", group="postfix")
        self.sasldb_path.chmod(0o640)
        self.users[user] = password

    def delete_user(self, user: str) -> None:
        """Remove ``user`` from the sasldb (``saslpasswd2 -d``)."""
        result = subprocess.run(
            [_find_sasl_program("saslpasswd2"), "-d", "-f", str(self.sasldb_path)]
            + ["-u", self.realm, user],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            raise PeerError(f"saslpasswd2 -d failed for {user!r}: {result.stderr.strip()}")
        self.users.pop(user, None)

    def list_users(self) -> list[str]:
        """``user@realm`` entries of the sasldb (from sasldblistusers2)."""
        result = subprocess.run(
            [_find_sasl_program("sasldblistusers2"), "-f", str(self.sasldb_path)],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        return [line.split(":", 1)[0].strip() for line in result.stdout.splitlines() if line]

    def _install_sasl_files(self) -> None:
        """Write smtpd.conf and the sasldb (idempotent); smtpd reads them when it starts."""
        if (self.sasl_dir / "smtpd.conf").exists():
            return
        self.sasl_dir.mkdir(mode=0o755, exist_ok=True)
        self.sasl_dir.chmod(0o755)
        for user, password in list(self.users.items()):
            self.add_user(user, password)
        if not self.users:  # smtpd must still find a database
            self.add_user("placeholder", os.urandom(8).hex())
            self.delete_user("placeholder")
        (self.sasl_dir / "smtpd.conf").write_text(
            "pwcheck_method: auxprop\n"
            "auxprop_plugin: sasldb\n"
            f"mech_list: {' '.join(self.mechanisms)}\n"
            f"sasldb_path: {self.sasldb_path}\n"
        )

    def _write_config(self, *args: Any, **kwargs: Any) -> None:
        # Hook: peers.Postfix writes main.cf/master.cf here, before `postfix start`.
        super()._write_config(*args, **kwargs)
        self._install_sasl_files()

    def start(self) -> SaslPostfix:
        if self._started:
            return self
        _find_sasl_program("saslpasswd2")
        for plugin in ("sasldb", *(m.lower() for m in self.mechanisms)):
            if not any(Path("/usr/lib").glob(f"*/sasl2/lib{plugin}.so*")):
                raise MissingProgramError(
                    f"the Cyrus SASL plugin lib{plugin}.so is missing: "
                    "apt-get install -y libsasl2-modules libsasl2-modules-db"
                )
        super().start()
        if not (self.sasl_dir / "smtpd.conf").exists():
            # Only if peers.Postfix stopped calling _write_config: smtpd starts on the first
            # connection and reads the SASL config then, so this is still in time.
            try:
                self._install_sasl_files()
            except BaseException:
                self.stop()
                raise
        return self

    def __enter__(self) -> SaslPostfix:
        return self.start()


def sasl_postfix(
    users: Mapping[str, str] | None = None,
    *,
    realm: str = DEFAULT_REALM,
    mechanisms: Iterable[str] = ("PLAIN", "LOGIN"),
    require_auth: bool = False,
    certs: Certs | None = None,
    extra_main_cf: Mapping[str, str] | None = None,
    **kw: Any,
) -> SaslPostfix:
    """A started :class:`SaslPostfix` (default user ``alice`` / ``secret``)."""
    return SaslPostfix(
        {"alice": "secret"} if users is None else users,
        realm=realm,
        mechanisms=mechanisms,
        require_auth=require_auth,
        certs=certs,
        extra_main_cf=extra_main_cf,
        **kw,
    ).start()


def _find_sasl_program(name: str) -> str:
    try:
        return find_program(name)
    except MissingProgramError:
        raise MissingProgramError(
            f"{name!r} is not installed: apt-get install -y sasl2-bin libsasl2-modules"
        ) from None


# --------------------------------------------------------------------------- HAProxy

_HAPROXY_CFG = """\
global
    log stderr format raw local0 info
    maxconn 4096

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 5s
    timeout client {client_timeout}
    timeout server {server_timeout}

frontend smtp_in
    bind {bind}
    default_backend smtp_out

backend smtp_out
    server upstream {backend}{server_options}
"""


_HAPROXY_PREFIX = "smtpguard-haproxy-"
_OWNER_FILE = "owner.pid"  # the pid of the test process that started the peer


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _reap_haproxy_orphans() -> None:
    """Kill haproxy processes left behind by a test run that died (SIGKILL, timeout): their
    folder's owner.pid names a process that is gone.  Remove those folders."""
    for owner_file in Path(tempfile.gettempdir()).glob(f"{_HAPROXY_PREFIX}*/{_OWNER_FILE}"):
        try:
            owner = int(owner_file.read_text())
        except (OSError, ValueError):
            continue
        if owner == os.getpid() or _pid_alive(owner):
            continue
        marker = f"{owner_file.parent}/haproxy.cfg".encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry), signal.SIGKILL)
        shutil.rmtree(owner_file.parent, ignore_errors=True)


class HAProxy:
    """Debian's haproxy in the foreground (``-db``) as a TCP proxy from ``host:port`` to
    ``backend`` ("host:port" or a (host, port) tuple).

    ``send_proxy`` is "v2" (``send-proxy-v2``), "v1" (``send-proxy``) or None (plain TCP):
    the PROXY header tells the backend the original client address.  Its connection log
    (``option tcplog``) is :meth:`log_text`.
    """

    def __init__(
        self,
        backend: str | tuple[str, int],
        *,
        send_proxy: str | None = "v2",
        host: str = "127.0.0.1",
        port: int | None = None,
        client_timeout: str = "60s",
        server_timeout: str = "60s",
        server_options: str = "",
    ) -> None:
        if isinstance(backend, tuple):
            bhost, bport = backend
            backend = f"[{bhost}]:{bport}" if ":" in bhost else f"{bhost}:{bport}"
        if send_proxy not in ("v1", "v2", None):
            raise ValueError(f"send_proxy must be 'v1', 'v2' or None, not {send_proxy!r}")
        self.backend = backend
        self.send_proxy = send_proxy
        self.host = host
        self.port = port or 0
        self.client_timeout = client_timeout
        self.server_timeout = server_timeout
        self.server_options = server_options
        self.base_dir = Path()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def config_path(self) -> Path:
        return self.base_dir / "haproxy.cfg"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "haproxy.log"

    def config(self) -> str:
        options = {"v1": " send-proxy", "v2": " send-proxy-v2", None: ""}[self.send_proxy]
        if self.server_options:
            options += " " + self.server_options
        bind = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        return _HAPROXY_CFG.format(
            bind=bind,
            backend=self.backend,
            server_options=options,
            client_timeout=self.client_timeout,
            server_timeout=self.server_timeout,
        )

    def _write_config(self) -> None:
        if self.base_dir == Path():
            _reap_haproxy_orphans()
            self.base_dir = Path(tempfile.mkdtemp(prefix=_HAPROXY_PREFIX))
            (self.base_dir / _OWNER_FILE).write_text(str(os.getpid()))
        if not self.port:
            self.port = free_port(self.host)
        self.config_path.write_text(self.config())

    def check_config(self) -> subprocess.CompletedProcess[str]:
        """``haproxy -c -f CONFIG`` (writes the config first); returncode 0 means valid."""
        self._write_config()
        return subprocess.run(
            [find_program("haproxy"), "-c", "-f", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )

    def start(self, timeout: float = 10) -> HAProxy:
        if self._proc is not None:
            return self
        binary = find_program("haproxy")
        _live.add(self)
        try:
            check = self.check_config()
            if check.returncode != 0:
                raise PeerError(
                    f"haproxy -c rejected the config ({check.returncode}):\n"
                    f"{check.stdout}{check.stderr}\n{self.config()}"
                )
            with self.log_path.open("wb") as log:
                self._proc = subprocess.Popen(
                    [binary, "-f", str(self.config_path), "-db"],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            proc = self._proc
            try:
                _wait_listening(self.host, self.port, timeout, alive=lambda: proc.poll() is None)
            except PeerError as exc:
                raise PeerError(f"haproxy: {exc}; log:\n{_tail(self.log_text())}") from None
        except BaseException:
            self.stop()
            raise
        return self

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 10) -> str:
        """Wait until the log contains regex ``pattern``; return the matching line."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log_text().splitlines():
                if regex.search(line):
                    return line
            if time.monotonic() > deadline:
                raise PeerError(f"no {pattern!r} in the haproxy log:\n{_tail(self.log_text())}")
            time.sleep(0.05)

    def stop(self, timeout: float = 10) -> None:
        proc, self._proc = self._proc, None
        try:
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=timeout)
        finally:
            _live.discard(self)
            if self.base_dir != Path():
                if _keep_dirs():
                    (self.base_dir / _OWNER_FILE).unlink(missing_ok=True)
                else:
                    shutil.rmtree(self.base_dir, ignore_errors=True)
                self.base_dir = Path()

    def __enter__(self) -> HAProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- raw SMTP client


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: its code and the text of each line (without code and separator)."""

    code: int
    lines: list[str]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def keywords(self) -> set[str]:
        """Upper-cased first words of an EHLO reply's lines after the first."""
        return {line.split()[0].upper() for line in self.lines[1:] if line.strip()}

    def __str__(self) -> str:
        return "\n".join(f"{self.code} {line}" for line in self.lines)


def xtext(value: str) -> str:
    """RFC 3461 xtext encoding (for XCLIENT / XFORWARD attribute values)."""
    return "".join(
        ch if 33 <= ord(ch) <= 126 and ch not in "+=" else f"+{ord(ch):02X}" for ch in value
    )


class SMTPClient:
    """A blocking SMTP client on a raw socket, one command at a time, bounded by ``timeout``.

    ``source_address`` binds the client socket first (any 127.x.y.z works on Linux loopback).
    The server greeting is in :attr:`banner`.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        source_address: str | None = None,
        timeout: float = 10,
        read_banner: bool = True,
    ) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection(
            (host, port),
            timeout=timeout,
            source_address=(source_address, 0) if source_address else None,
        )
        self._buf = b""
        self.banner: Reply | None = None
        if read_banner:
            self.banner = self.read_reply()

    @property
    def local_address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return (str(host), int(port))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read_line(self) -> bytes:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise PeerError(f"connection closed by the server; partial data {self._buf!r}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.rstrip(b"\r")

    def read_reply(self) -> Reply:
        lines: list[str] = []
        while True:
            raw = self._read_line().decode("utf-8", errors="replace")
            if len(raw) < 3 or not raw[:3].isdigit():
                raise PeerError(f"malformed SMTP reply line {raw!r}")
            lines.append(raw[4:])
            if raw[3:4] != "-":
                return Reply(int(raw[:3]), lines)

    def command(self, line: str) -> Reply:
        self.send_raw(line.encode() + b"\r\n")
        return self.read_reply()

    def ehlo(self, name: str = "client.test") -> Reply:
        return self.command(f"EHLO {name}")

    def xclient(self, **attrs: str) -> Reply:
        """``XCLIENT K=V ...`` (names upper-cased, values xtext-encoded); Postfix says 220."""
        args = " ".join(f"{key.upper()}={xtext(str(value))}" for key, value in attrs.items())
        return self.command(f"XCLIENT {args}")

    def auth_plain(self, user: str, password: str) -> Reply:
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return self.command(f"AUTH PLAIN {token}")

    def starttls(
        self, context: ssl.SSLContext | None = None, server_hostname: str | None = None
    ) -> Reply:
        """STARTTLS, then the TLS handshake if the server said 220 (EHLO again after this)."""
        reply = self.command("STARTTLS")
        if reply.code == 220:
            if self._buf:
                raise PeerError(f"data after the STARTTLS reply: {self._buf!r}")
            if context is None:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)
        return reply

    def send_message(self, sender: str, recipients: Iterable[str], content: bytes) -> list[Reply]:
        """MAIL, RCPT..., DATA and the content (dot-stuffed here; must end with CRLF).

        Stops at the first failing step; returns every reply received.
        """
        replies = [self.command(f"MAIL FROM:<{sender}>")]
        if replies[-1].code != 250:
            return replies
        for rcpt in recipients:
            replies.append(self.command(f"RCPT TO:<{rcpt}>"))
        if not any(r.code == 250 for r in replies[1:]):
            return replies
        replies.append(self.command("DATA"))
        if replies[-1].code != 354:
            return replies
        stuffed = b"\r\n".join(
            b"." + line if line.startswith(b".") else line for line in content.split(b"\r\n")
        )
        self.send_raw(stuffed + b".\r\n")
        replies.append(self.read_reply())
        return replies

    def quit(self) -> Reply | None:
        try:
            return self.command("QUIT")
        except (OSError, PeerError):
            return None
        finally:
            self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> SMTPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
