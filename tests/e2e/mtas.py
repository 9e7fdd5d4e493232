"""Real Exim 4 and OpenSMTPD peers on loopback for end-to-end tests (Postfix is in peers.py).

Both are Debian 12's own binaries, unpacked by ``./test.sh`` into ``/opt/smtpguard-peers``
beside Postfix (the packages conflict with it; see test.sh).  Like :class:`peers.Postfix`, each
instance is private: it runs as root from a temp folder, listens on ``127.0.0.1:<free port>``,
accepts mail for any domain from 127.0.0.0/8 and delivers every message to a capture folder,
envelope included (:meth:`messages` returns :class:`peers.CapturedMessage` objects).  A
recipient whose local part starts with ``reject`` (``reject-1@dest.example``) is refused at RCPT
with a 550 by both.

Per-session transcripts (:meth:`transcript`, :meth:`sessions`) list, in order, each command line
the MTA read (``("<", "RCPT TO:<a@b>")``) and each reply line it wrote (``(">", "250 OK")``, one
item per line of a multi-line reply), keyed by the client's port:

- Exim: its debug output (``-d-all+receive+pid``), from which the ``SMTP<<`` / ``SMTP>>`` lines
  and the ``Process N is handling incoming connection from [127.0.0.1]:PORT`` line are read.
- OpenSMTPD: a report-only filter (``filter ... proc-exec``) subscribed to the ``smtp-in``
  ``link-connect``, ``protocol-client``, ``protocol-server`` and ``link-disconnect`` events, which
  name the client's address and port.  Its log (stderr of ``smtpd -d -v -T smtp``) also has the
  ``<<<`` / ``>>>`` trace, without ports.

Transcript offsets are offsets into that trace file (:meth:`trace_offset`), not into the main log
(:meth:`log_offset`); take one before the client connects, since a session is recognised by its
first (connection) line.

:class:`EximClient` is Exim as a sending client (a smarthost route, ``hosts_try_chunking = *``):
:meth:`EximClient.send` submits one message with ``exim -odi`` and returns what its log and
debug output say about the delivery.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from peers import (
    CapturedMessage,
    Captures,
    MissingProgramError,
    PeerError,
    Postfix,
    _alive,
    _keep_dirs,
    _listening,
    _pids_matching,
    _tail,
    _wait,
    find_program,
    free_port,
)

PREFIX = Path("/opt/smtpguard-peers")
EXIM_BINARY = PREFIX / "exim4/usr/sbin/exim4"
# The one -C file /etc/exim4/trusted_configs lists; it only does `.include OUTGOING/exim4.conf`.
EXIM_TRUSTED_CONFIG = PREFIX / "exim4/instance.conf"
EXIM_TRUSTED_LIST = Path("/etc/exim4/trusted_configs")
SMTPD_BINARY = PREFIX / "opensmtpd/usr/sbin/smtpd"
# Compiled into Debian's smtpd: bind-mounted (spool, /run) or provided by test.sh.
SMTPD_SPOOL = Path("/var/spool/smtpd")
SMTPD_LIBEXEC = Path("/usr/libexec/opensmtpd")
SMTPD_CHROOT = Path("/var/lib/opensmtpd/empty")

_ENV_MARKER = "SMTPGUARD_MTA_DIR"
_OWNER_FILE = "owner.pid"
_TEMP_PREFIXES = ("smtpguard-exim-", "smtpguard-eximclient-", "smtpguard-opensmtpd-")


def _missing(what: str) -> MissingProgramError:
    return MissingProgramError(
        f"{what}: the end-to-end tests need Exim 4 and OpenSMTPD unpacked into {PREFIX}. "
        "Run ./test.sh (it installs them beside Postfix)."
    )


def _check_exim() -> None:
    if not os.access(EXIM_BINARY, os.X_OK):
        raise _missing(f"{EXIM_BINARY} is missing")
    try:
        trusted = EXIM_TRUSTED_LIST.read_text().split()
    except OSError:
        trusted = []
    if str(EXIM_TRUSTED_CONFIG) not in trusted or not EXIM_TRUSTED_CONFIG.exists():
        raise _missing(f"{EXIM_TRUSTED_CONFIG} is missing or not in {EXIM_TRUSTED_LIST}")
    try:
        pwd.getpwnam("Debian-exim")
    except KeyError:
        raise _missing("user Debian-exim is missing") from None
    if os.geteuid() != 0:
        raise PeerError("a private Exim instance needs root")


def _check_smtpd() -> None:
    if not os.access(SMTPD_BINARY, os.X_OK):
        raise _missing(f"{SMTPD_BINARY} is missing")
    for path in (SMTPD_SPOOL, SMTPD_CHROOT, SMTPD_LIBEXEC / "mail.mda"):
        if not path.exists():
            raise _missing(f"{path} is missing")
    for user in ("opensmtpd", "opensmtpq", "nobody"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            raise _missing(f"user {user} is missing") from None
    for program in ("unshare", "mount"):
        if shutil.which(program, path="/usr/bin:/bin:/usr/sbin:/sbin") is None:
            raise _missing(f"{program} (util-linux) is missing")
    if os.geteuid() != 0:
        raise PeerError("a private OpenSMTPD instance needs root (mount namespace)")


# --------------------------------------------------------------------------- process hygiene

_live: set[_Instance | EximClient] = set()


@atexit.register
def _stop_all() -> None:
    for peer in list(_live):
        with contextlib.suppress(Exception):
            peer.stop()


def _make_base_dir(prefix: str) -> Path:
    _reap_orphans()
    base = Path(tempfile.mkdtemp(prefix=prefix))
    base.chmod(0o755)  # Debian-exim, nobody and opensmtpd must reach their folders
    (base / _OWNER_FILE).write_text(str(os.getpid()))
    return base


def _release_base_dir(base: Path) -> None:
    if _keep_dirs():
        (base / _OWNER_FILE).unlink(missing_ok=True)
    else:
        shutil.rmtree(base, ignore_errors=True)


def _markers(base: Path) -> tuple[bytes, bytes]:
    """(environment marker, command-line marker) of every process of the instance in ``base``.

    Exim re-executes itself with ``-DOUTGOING=<base>`` (and a cleaned environment); smtpd's
    children keep the environment it was started with, and its filter's command line names
    ``base``.
    """
    return f"{_ENV_MARKER}={base}".encode(), f"{base}/".encode()


def _kill_instance(pgid: int | None, base: Path, timeout: float) -> None:
    env_marker, cmd_marker = _markers(base)
    cmd_exim = f"-DOUTGOING={base}".encode()

    def pids() -> list[int]:
        found = set(_pids_matching(pgid, env_marker, cmd_marker))
        found.update(_pids_matching(None, env_marker, cmd_exim))
        return sorted(found)

    deadline = time.monotonic() + timeout
    while pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _reap_orphans() -> None:
    """Kill what runs from temp folders of test runs that died without cleaning up."""
    for prefix in _TEMP_PREFIXES:
        for owner_file in Path(tempfile.gettempdir()).glob(f"{prefix}*/{_OWNER_FILE}"):
            try:
                owner = int(owner_file.read_text())
            except (OSError, ValueError):
                continue
            if owner == os.getpid() or _alive(owner):
                continue
            _kill_instance(None, owner_file.parent, 0)
            shutil.rmtree(owner_file.parent, ignore_errors=True)


# --------------------------------------------------------------------------- transcripts


@dataclass
class Session:
    """One SMTP session as the MTA saw it: ``lines`` are ``("<", command)`` read and
    ``(">", reply line)`` written, in order.  ``client`` is ``(host, port)``."""

    id: str
    client: tuple[str, int] | None
    lines: list[tuple[str, str]] = field(default_factory=list)
    closed: bool = False

    @property
    def client_port(self) -> int | None:
        return self.client[1] if self.client else None

    @property
    def commands(self) -> list[str]:
        return [text for direction, text in self.lines if direction == "<"]

    @property
    def replies(self) -> list[str]:
        """Reply lines (each line of a multi-line reply on its own)."""
        return [text for direction, text in self.lines if direction == ">"]


def _split_client(text: str) -> tuple[str, int] | None:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


_EXIM_DEBUG_RE = re.compile(r"^\s*(\d+) (.*)$")
_EXIM_CONNECT_RE = re.compile(r"^Process \d+ is handling incoming connection from (\S+)$")
_EXIM_CONTINUATION_RE = re.compile(r"^ {7}(\d{3}[- ].*)$")


def parse_exim_debug(text: str) -> list[Session]:
    """Sessions in Exim server debug output (``-d+receive+pid``), in connection order."""
    sessions: list[Session] = []
    current: dict[str, Session] = {}
    in_reply: dict[str, bool] = {}
    for line in text.splitlines():
        match = _EXIM_DEBUG_RE.match(line)
        if match is None:
            continue
        pid, rest = match.groups()
        connect = _EXIM_CONNECT_RE.match(rest)
        if connect:
            session = Session(id=pid, client=_split_client(connect.group(1)))
            sessions.append(session)
            current[pid] = session
            in_reply[pid] = False
            continue
        session = current.get(pid)
        if session is None:
            continue
        if rest.startswith("SMTP<< "):
            session.lines.append(("<", rest[7:]))
            in_reply[pid] = False
        elif rest.startswith("SMTP>> "):
            session.lines.append((">", rest[7:]))
            in_reply[pid] = True
        elif rest.startswith("SMTP>>(close") or "terminating with rc=" in rest:
            session.closed = True
            del current[pid]
        elif in_reply[pid] and (cont := _EXIM_CONTINUATION_RE.match(rest)):
            session.lines.append((">", cont.group(1)))
        else:
            in_reply[pid] = False
    return sessions


def parse_smtpd_reports(text: str) -> list[Session]:
    """Sessions in the smtp-in report stream of OpenSMTPD's report filter, in connection order.

    Lines look like ``report|0.6|<time>|smtp-in|protocol-client|<session>|RCPT TO:<a@b>``.
    """
    sessions: list[Session] = []
    by_id: dict[str, Session] = {}
    for line in text.splitlines():
        fields = line.split("|", 6)
        if len(fields) < 6 or fields[0] != "report" or fields[3] != "smtp-in":
            continue
        event, sid = fields[4], fields[5]
        rest = fields[6] if len(fields) > 6 else ""
        if event == "link-connect":
            # rest: rdns|fcrdns|src|dest
            parts = rest.split("|")
            client = _split_client(parts[2]) if len(parts) > 2 else None
            session = Session(id=sid, client=client)
            sessions.append(session)
            by_id[sid] = session
            continue
        session = by_id.get(sid)
        if session is None:
            continue
        if event == "protocol-client":
            session.lines.append(("<", rest))
        elif event == "protocol-server":
            session.lines.append((">", rest))
        elif event == "link-disconnect":
            session.closed = True
    return sessions


# --------------------------------------------------------------------------- common base


class _Instance(Captures):
    """What Exim and OpenSMTPD servers share: temp folder, process, logs, captures."""

    _prefix = "smtpguard-mta-"
    name = "MTA"

    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or 0
        self.base_dir = Path()
        self._proc: subprocess.Popen[bytes] | None = None
        self._started = False
        self._cache: dict[str, CapturedMessage] = {}

    # -- paths
    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def captured_dir(self) -> Path:
        return self.base_dir / "captured"

    @property
    def log_path(self) -> Path:
        raise NotImplementedError

    @property
    def trace_path(self) -> Path:
        raise NotImplementedError

    @property
    def _stderr_path(self) -> Path:
        return self.trace_path

    # -- lifecycle
    def _prepare(self) -> None:
        """Write the config files into ``base_dir``."""
        raise NotImplementedError

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        return _listening(self.host, self.port)

    def start(self, timeout: float = 20) -> _Instance:
        if self._started:
            return self
        self._check()
        if not self.port:
            self.port = free_port(self.host)
        self.base_dir = _make_base_dir(self._prefix)
        self._started = True
        _live.add(self)
        try:
            self.captured_dir.mkdir()
            nobody = pwd.getpwnam("nobody")
            os.chown(self.captured_dir, nobody.pw_uid, nobody.pw_gid)
            self._prepare()
            env = dict(os.environ, **{_ENV_MARKER: str(self.base_dir)})
            with self._stderr_path.open("ab") as stderr:
                self._proc = subprocess.Popen(
                    self._command(),
                    cwd=self.base_dir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    start_new_session=True,
                )
            deadline = time.monotonic() + timeout
            while not self._ready():
                if self._proc.poll() is not None:
                    raise PeerError(
                        f"{self.name} exited with {self._proc.returncode}:\n"
                        f"{_tail(self._startup_output())}"
                    )
                if time.monotonic() > deadline:
                    raise PeerError(
                        f"{self.name} not listening on {self.host}:{self.port} within "
                        f"{timeout}s:\n{_tail(self._startup_output())}"
                    )
                time.sleep(0.02)
        except BaseException:
            self.stop()
            raise
        return self

    def _check(self) -> None:
        raise NotImplementedError

    def _startup_output(self) -> str:
        return self.log_text() + "\n" + self.trace_since(0)

    def stop(self, timeout: float = 10) -> None:
        """Stop the MTA (SIGTERM, then SIGKILL leftovers), wait for the port, remove the folder."""
        if not self._started:
            return
        self._started = False
        proc, self._proc = self._proc, None
        pgid = proc.pid if proc is not None else None
        try:
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout / 2)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
            _kill_instance(pgid, self.base_dir, timeout / 4)
            if self.port:
                _wait(
                    lambda: not _listening(self.host, self.port),
                    timeout / 4,
                    what=f"port {self.host}:{self.port} to be released",
                )
        finally:
            _live.discard(self)
            self._cache.clear()
            _release_base_dir(self.base_dir)

    def __enter__(self) -> _Instance:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- main log
    def log_text(self) -> str:
        return self.log_since(0)

    def log_offset(self) -> int:
        """Current size of the main log: pass it to :meth:`log_since` / :meth:`wait_for_log`."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, offset: int) -> str:
        return _read_since(self.log_path, offset)

    def wait_for_log(
        self, pattern: str, since_offset: int = 0, timeout: float = 10
    ) -> re.Match[str]:
        """First match of regex ``pattern`` (MULTILINE) in the main log after ``since_offset``."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log_since(since_offset))
            if match is not None:
                return match
            if time.monotonic() > deadline:
                raise PeerError(
                    f"no {pattern!r} in the {self.name} log within {timeout}s; log since "
                    f"offset:\n{_tail(self.log_since(since_offset))}"
                )
            time.sleep(0.05)

    # -- transcripts
    def trace_offset(self) -> int:
        """Current size of the trace file: pass it to :meth:`sessions` / :meth:`transcript`."""
        try:
            return self.trace_path.stat().st_size
        except FileNotFoundError:
            return 0

    def trace_since(self, offset: int) -> str:
        text = _read_since(self.trace_path, offset)
        return text[: text.rfind("\n") + 1]  # complete lines only

    def _parse_trace(self, text: str) -> list[Session]:
        raise NotImplementedError

    def sessions(self, since_offset: int = 0) -> list[Session]:
        """SMTP sessions that started after trace offset ``since_offset``, oldest first."""
        return self._parse_trace(self.trace_since(since_offset))

    def transcript(
        self, since_offset: int = 0, client_port: int | None = None
    ) -> list[tuple[str, str]]:
        """``("<", command)`` / ``(">", reply line)`` items of the sessions after
        ``since_offset`` (a :meth:`trace_offset`); with ``client_port``, of the last session
        from that port only (``[]`` if there is none yet)."""
        found = self.sessions(since_offset)
        if client_port is None:
            return [item for session in found for item in session.lines]
        for session in reversed(found):
            if session.client_port == client_port:
                return list(session.lines)
        return []

    def wait_for_session(
        self, client_port: int, since_offset: int = 0, timeout: float = 10
    ) -> Session:
        """The session from ``client_port`` once the MTA has closed it."""
        deadline = time.monotonic() + timeout
        while True:
            for session in reversed(self.sessions(since_offset)):
                if session.client_port == client_port and session.closed:
                    return session
            if time.monotonic() > deadline:
                raise PeerError(
                    f"no closed {self.name} session from port {client_port} within {timeout}s;"
                    f" sessions: {self.sessions(since_offset)}"
                )
            time.sleep(0.05)

    def wait_for_transcript(
        self, client_port: int, since_offset: int = 0, timeout: float = 10
    ) -> list[tuple[str, str]]:
        """:meth:`transcript` of ``client_port``'s session, once the MTA has closed it."""
        return list(self.wait_for_session(client_port, since_offset, timeout).lines)

    # -- captured mail
    def queue_files(self) -> list[Path]:
        raise NotImplementedError

    def wait_queue_empty(self, timeout: float = 10) -> None:
        try:
            _wait(lambda: not self.queue_files(), timeout, what=f"the {self.name} queue to drain")
        except PeerError as exc:
            raise PeerError(f"{exc}; log:\n{_tail(self.log_text())}") from None

    def _captured(self) -> list[CapturedMessage]:
        """One CapturedMessage per complete capture, oldest first."""
        found = []
        for name in sorted(n for n in os.listdir(self.captured_dir) if n.endswith(".env")):
            if name.startswith("."):
                continue  # ".NAME.env" is still being written
            if name not in self._cache:
                self._cache[name] = _read_capture(self.captured_dir / name)
            found.append(self._cache[name])
        return found

    def messages(self, timeout: float | None = None) -> list[CapturedMessage]:
        """Captured messages, oldest delivery first.

        With ``timeout``, first wait (up to that long) until the queue is empty, i.e. every
        message accepted so far has been delivered.
        """
        if timeout is not None:
            self.wait_queue_empty(timeout)
        return self._captured()


def _read_since(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            return handle.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def _read_capture(env_path: Path) -> CapturedMessage:
    sender = ""
    recipients = []
    queue_id = ""
    for line in env_path.read_text().splitlines():
        kind, _, value = line.partition(" ")
        if kind == "sender":
            sender = value
        elif kind == "rcpt":
            recipients.append(value)
        elif kind == "id":
            queue_id = value
    name = env_path.stem
    eml = env_path.with_suffix(".eml")
    return CapturedMessage(
        name=name,
        queue_id=queue_id,
        sender=sender,
        recipients=recipients,
        data=eml.read_bytes(),
        path=eml,
    )


def _files_under(*dirs: Path) -> list[Path]:
    files: list[Path] = []
    for top in dirs:
        for root, _dirs, names in os.walk(top):
            files.extend(Path(root, name) for name in names)
    return files


# --------------------------------------------------------------------------- Exim

# Runs as nobody under Exim's pipe transport: capture.sh DIR MESSAGE_ID RECIPIENT...
# ($SENDER comes from the pipe transport's environment: Exim 4.96 refuses tainted data such as
# $sender_address in a command's arguments).  Writes NAME.eml, then NAME.env ("id", "sender"
# and "rcpt" lines); NAME.env appearing means NAME is complete.
_EXIM_CAPTURE_SH = """\
#!/bin/sh
dir=$1 id=$2
shift 2
name=$(date +%s%N)-$id
umask 022
cat >"$dir/.$name.eml" || exit 75
{
    printf 'id %s\\n' "$id"
    printf 'sender %s\\n' "$SENDER"
    for rcpt in "$@"; do printf 'rcpt %s\\n' "$rcpt"; done
} >"$dir/.$name.env" || exit 75
mv "$dir/.$name.eml" "$dir/$name.eml" || exit 75
mv "$dir/.$name.env" "$dir/$name.env" || exit 75
exit 0
"""

EXIM_LOG_SELECTOR = (
    "+smtp_protocol_error +smtp_syntax_error +pipelining +smtp_incomplete_transaction "
    "+incoming_port +outgoing_port +received_recipients +deliver_time"
)


def _exim_main(settings: Mapping[str, str]) -> str:
    return "".join(f"{key} = {value}\n".replace(" = \n", " =\n") for key, value in settings.items())


def _exim_common(primary_hostname: str) -> dict[str, str]:
    """Main-section settings every private Exim (server or client) uses."""
    return {
        "exim_path": str(EXIM_BINARY),
        "spool_directory": "OUTGOING/spool",
        "log_file_path": "OUTGOING/log/%slog",
        "pid_file_path": "OUTGOING/exim.pid",
        "primary_hostname": primary_hostname,
        "qualify_domain": "smtpguard.test",
        "host_lookup": "",  # no DNS
        "rfc1413_hosts": "",
        "keep_environment": "",
        "tls_advertise_hosts": "",  # no certificate here: no STARTTLS
        "never_users": "root",
        "log_selector": EXIM_LOG_SELECTOR,
        "message_logs": "false",
        "ignore_bounce_errors_after": "0s",
        "timeout_frozen_after": "1m",
    }


class Exim(_Instance):
    """A private Exim 4.96 daemon on ``host:port`` in a temp folder, capturing all it accepts.

    Debian-default-like EHLO (``SIZE 52428800 8BITMIME PIPELINING [PIPECONNECT] CHUNKING
    SMTPUTF8 HELP``; no STARTTLS since there is no certificate), ``smtp_enforce_sync`` on, and
    the log selectors ``+smtp_protocol_error +smtp_syntax_error +pipelining
    +smtp_incomplete_transaction`` (plus ports and recipients) in :attr:`log_path`.

    ``pipeconnect=False`` sets ``pipelining_connect_advertise_hosts =`` (empty): Exim then
    checks synchronization on every command, including input sent before the greeting.  With
    ``True`` (Exim's default) it advertises PIPECONNECT and skips the check until the first
    DATA/BDAT.  ``chunking=False`` stops advertising CHUNKING.  ``extra_main`` adds or
    overrides main-section settings (values are Exim syntax, macros such as ``OUTGOING`` — the
    instance folder — allowed).  ``trace=False`` runs without debug output (no transcripts).

    Every accepted message is delivered once, all recipients together, by a pipe transport into
    :attr:`captured_dir`; the captured data has LF line ends and one ``Received:`` header first.
    """

    _prefix = "smtpguard-exim-"
    name = "Exim"

    def __init__(
        self,
        *,
        pipeconnect: bool = False,
        chunking: bool = True,
        extra_main: Mapping[str, str] | None = None,
        trace: bool = True,
        host: str = "127.0.0.1",
        port: int | None = None,
        primary_hostname: str = "exim.smtpguard.test",
    ) -> None:
        super().__init__(host=host, port=port)
        self.pipeconnect = pipeconnect
        self.chunking = chunking
        self.extra_main = dict(extra_main or {})
        self.trace = trace
        self.primary_hostname = primary_hostname

    @property
    def config_path(self) -> Path:
        return self.base_dir / "exim4.conf"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "log" / "mainlog"

    @property
    def reject_log_path(self) -> Path:
        return self.base_dir / "log" / "rejectlog"

    @property
    def panic_log_path(self) -> Path:
        return self.base_dir / "log" / "paniclog"

    @property
    def trace_path(self) -> Path:
        """Exim's debug output (stderr of the daemon and its children)."""
        return self.base_dir / "debug.log"

    def main_settings(self) -> dict[str, str]:
        host = f"<; {self.host}"
        settings = _exim_common(self.primary_hostname)
        settings.update(
            {
                "daemon_smtp_ports": str(self.port),
                "local_interfaces": host,
                "smtp_enforce_sync": "true",
                "pipelining_connect_advertise_hosts": "*" if self.pipeconnect else "",
                "chunking_advertise_hosts": "*" if self.chunking else "",
                "acl_smtp_rcpt": "acl_check_rcpt",
                # Deliver every message at once, however many arrive on one connection, and
                # take the load tests' connections.
                "smtp_accept_queue_per_connection": "0",
                "smtp_accept_max": "200",
                "smtp_connect_backlog": "128",
            }
        )
        settings.update(self.extra_main)
        return settings

    def config(self) -> str:
        return (
            _exim_main(self.main_settings())
            + "hostlist relay_from_hosts = <; 127.0.0.0/8 ; ::1\n"
            + """
begin acl

acl_check_rcpt:
  deny    local_parts = ^reject
          message = recipient $local_part@$domain refused (local part reject*)
  accept  hosts = +relay_from_hosts
  deny    message = relay not permitted

begin routers

capture:
  driver = accept
  transport = capture

begin transports

capture:
  driver = pipe
  command = /bin/sh OUTGOING/capture.sh OUTGOING/captured $message_exim_id $pipe_addresses
  user = nobody
  batch_max = 10000
  message_prefix =
  message_suffix =
  return_fail_output = true
  temp_errors = 75

begin retry

*   *   F,1h,10s
"""
        )

    def _check(self) -> None:
        _check_exim()

    def _prepare(self) -> None:
        exim = pwd.getpwnam("Debian-exim")
        for sub in ("spool", "log"):
            (self.base_dir / sub).mkdir()
            os.chown(self.base_dir / sub, exim.pw_uid, exim.pw_gid)
        script = self.base_dir / "capture.sh"
        script.write_text(_EXIM_CAPTURE_SH)
        script.chmod(0o755)
        self.config_path.write_text(self.config())
        self.config_path.chmod(0o644)

    def exim_args(self) -> list[str]:
        """``exim -C ... -DOUTGOING=...``: the start of any command line for this instance."""
        return [str(EXIM_BINARY), "-C", str(EXIM_TRUSTED_CONFIG), f"-DOUTGOING={self.base_dir}"]

    def _command(self) -> list[str]:
        debug = ["-d-all+receive+pid"] if self.trace else []
        return [*self.exim_args(), "-bdf", *debug]

    def _ready(self) -> bool:
        return (self.base_dir / "exim.pid").exists() and _listening(self.host, self.port)

    def _startup_output(self) -> str:
        panic = _read_since(self.panic_log_path, 0)
        return f"{self.log_text()}\n{panic}\n{_tail(self.trace_since(0), 15)}"

    def exim(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run this instance's exim with ``args`` (e.g. ``"-bp"`` to list the queue); the exit
        status is not checked."""
        return subprocess.run(
            [*self.exim_args(), *args],
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=60,
            cwd=self.base_dir,
        )

    def _parse_trace(self, text: str) -> list[Session]:
        if not self.trace:
            raise PeerError("this Exim runs without trace=True: no transcripts")
        return parse_exim_debug(text)

    def queue_files(self) -> list[Path]:
        """Messages not yet delivered (the spool's input folder)."""
        return _files_under(self.base_dir / "spool" / "input")


# --------------------------------------------------------------------------- Exim as a client


@dataclass
class EximDelivery:
    """What Exim's log says about one submitted message.

    ``recipients`` maps each recipient to ``"delivered"``, ``"deferred"`` or ``"bounced"``;
    ``status`` is the common value, or ``"mixed"``.  ``pipelining`` / ``chunking`` are True if
    a delivery line carries Exim's ``L`` / ``K`` flag.  ``transcript`` is the client side of
    the SMTP dialog from Exim's debug output: ``(">", command sent)`` and ``("<", reply line
    read)``, the direction again relative to Exim.  ``pipelined`` lists the commands Exim
    buffered (``SMTP|>`` / ``SMTP+>``) rather than flushed one by one; the final QUIT is
    always among them (it goes out with the socket shutdown, after the last reply).
    ``returncode`` is exim's exit status (0 even when a recipient bounced or was deferred).
    """

    message_id: str
    status: str
    recipients: dict[str, str]
    log: str
    pipelining: bool
    chunking: bool
    transcript: list[tuple[str, str]]
    pipelined: list[str]
    returncode: int

    @property
    def delivered(self) -> bool:
        return self.status == "delivered"


_DELIVERY_RE = re.compile(
    r"^\S+ \S+ (?P<id>\S+) (?P<mark>=>|->|==|\*\*) (?P<rcpt>\S+)(?: <(?P<orig>[^>]*)>)?"
    r"(?P<rest>.*)$",
    re.MULTILINE,
)
_FLAGS_RE = re.compile(r"\]:\d+(?P<flags>(?: [A-Z*]{1,2})*)(?: |$)")
_EXIM_CLIENT_DEBUG_RE = re.compile(r"^ {2}SMTP(<<|>>|\|>|\+>) (.*)$")
_EXIM_CLIENT_CONT_RE = re.compile(r"^ {9}(\d{3}[- ].*)$")


def parse_exim_client_debug(text: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(transcript, buffered commands) from Exim's ``-d+transport`` output as a client."""
    transcript: list[tuple[str, str]] = []
    buffered: list[str] = []
    in_reply = False
    for line in text.splitlines():
        match = _EXIM_CLIENT_DEBUG_RE.match(line)
        if match:
            kind, payload = match.groups()
            if kind == "<<":
                transcript.append(("<", payload))
                in_reply = True
                continue
            in_reply = False
            if payload.startswith("("):
                continue  # "(writing message)"
            transcript.append((">", payload))
            if kind in ("|>", "+>"):
                buffered.append(payload)
            continue
        cont = _EXIM_CLIENT_CONT_RE.match(line)
        if in_reply and cont:
            transcript.append(("<", cont.group(1)))
        else:
            in_reply = False
    return transcript, buffered


class EximClient:
    """Exim 4.96 as a sending MTA: every message goes to ``smarthost`` (host, port).

    A manualroute router sends everything there through an smtp transport with
    ``hosts_try_chunking = *`` (BDAT when the server offers CHUNKING; ``chunking=False``
    turns that off) and PIPELINING when offered (``pipelining=False`` sets
    ``hosts_avoid_pipelining = *``).  No daemon runs: :meth:`send` submits one message with
    ``exim -odi`` (delivery before it returns).  TCP Fast Open is off unless ``fastopen``.
    Bounces are discarded instead of being sent to the smarthost.  ``extra_transport`` adds
    or overrides options of the smtp transport.
    """

    _prefix = "smtpguard-eximclient-"
    name = "Exim client"

    def __init__(
        self,
        smarthost: tuple[str, int],
        *,
        chunking: bool = True,
        pipelining: bool = True,
        fastopen: bool = False,
        helo: str = "client.smtpguard.test",
        extra_transport: Mapping[str, str] | None = None,
    ) -> None:
        self.smarthost = smarthost
        self.chunking = chunking
        self.pipelining = pipelining
        self.fastopen = fastopen
        self.helo = helo
        self.extra_transport = dict(extra_transport or {})
        self.base_dir = Path()
        self._started = False
        self._lock = threading.Lock()

    @property
    def log_path(self) -> Path:
        return self.base_dir / "log" / "mainlog"

    def config(self) -> str:
        host, port = self.smarthost
        settings = _exim_common(self.helo)
        settings["daemon_smtp_ports"] = ""
        transport = {
            "driver": "smtp",
            "port": str(port),
            "allow_localhost": "true",
            "hosts_try_chunking": "*" if self.chunking else "",
            "hosts_avoid_tls": "*",
            "hosts_try_fastopen": "*" if self.fastopen else "",
            "helo_data": self.helo,
        }
        if not self.pipelining:
            transport["hosts_avoid_pipelining"] = "*"
        transport.update(self.extra_transport)
        route_host = host.replace(":", "::")  # an IPv6 address in a colon-separated list
        return (
            _exim_main(settings)
            + f"""
begin routers

drop_bounces:
  driver = redirect
  senders = :
  data = :blackhole:

smarthost:
  driver = manualroute
  route_list = * {route_host}
  self = send
  transport = remote_smtp
  no_more

begin transports

remote_smtp:
"""
            + "".join(
                f"  {key} = {value}\n".replace(" = \n", " =\n") for key, value in transport.items()
            )
            + """
begin retry

*   *   F,1h,1s
"""
        )

    def start(self) -> EximClient:
        if self._started:
            return self
        _check_exim()
        self.base_dir = _make_base_dir(self._prefix)
        self._started = True
        _live.add(self)
        try:
            exim = pwd.getpwnam("Debian-exim")
            for sub in ("spool", "log"):
                (self.base_dir / sub).mkdir()
                os.chown(self.base_dir / sub, exim.pw_uid, exim.pw_gid)
            (self.base_dir / "exim4.conf").write_text(self.config())
            (self.base_dir / "exim4.conf").chmod(0o644)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 5) -> None:
        if not self._started:
            return
        self._started = False
        try:
            _kill_instance(None, self.base_dir, timeout)
        finally:
            _live.discard(self)
            _release_base_dir(self.base_dir)

    def __enter__(self) -> EximClient:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def exim_args(self) -> list[str]:
        return [str(EXIM_BINARY), "-C", str(EXIM_TRUSTED_CONFIG), f"-DOUTGOING={self.base_dir}"]

    def send(
        self,
        sender: str,
        recipients: Iterable[str],
        data: bytes,
        *,
        timeout: float = 60,
    ) -> EximDelivery:
        """Submit ``data`` (a whole message, CRLF or LF line ends) from ``sender`` to
        ``recipients`` and deliver it at once; return what the log says about it.

        Exim adds ``Received:``, and ``Message-Id:``/``Date:``/``From:`` if missing.  The
        hints database is cleared first, so an earlier failure does not delay this delivery.
        """
        if not self._started:
            raise PeerError("EximClient.send before start()")
        rcpts = list(recipients)
        with self._lock:
            for hints in (self.base_dir / "spool" / "db").glob("*"):
                hints.unlink(missing_ok=True)
            offset = _file_size(self.log_path)
            result = subprocess.run(
                [*self.exim_args(), "-odi", "-oi", "-d-all+transport", "-f", sender, "--", *rcpts],
                input=data,
                capture_output=True,
                timeout=timeout,
                cwd=self.base_dir,
            )
            debug = result.stderr.decode("utf-8", errors="replace")
            ids = re.findall(r" -Mc (\S+)", debug)
            if not ids:
                raise PeerError(
                    f"exim -odi exited with {result.returncode} without a message id:\n"
                    f"{_tail(debug)}\nlog:\n{_tail(_read_since(self.log_path, offset))}"
                )
            return self._delivery(ids[0], offset, debug, result.returncode, rcpts)

    def _delivery(
        self, message_id: str, offset: int, debug: str, returncode: int, rcpts: Sequence[str]
    ) -> EximDelivery:
        log = _read_since(self.log_path, offset)
        own = "".join(
            line + "\n" for line in log.splitlines() if line.split(" ", 3)[2:3] == [message_id]
        )
        statuses: dict[str, str] = {}
        pipelining = chunking = False
        marks = {"=>": "delivered", "->": "delivered", "==": "deferred", "**": "bounced"}
        for match in _DELIVERY_RE.finditer(own):
            rcpt = match.group("orig") or match.group("rcpt")
            statuses[rcpt] = marks[match.group("mark")]
            if match.group("mark") in ("=>", "->"):
                flags_match = _FLAGS_RE.search(match.group("rest"))
                flags = flags_match.group("flags").split() if flags_match else []
                pipelining = pipelining or "L" in flags
                chunking = chunking or "K" in flags
        for rcpt in rcpts:
            statuses.setdefault(rcpt, "unknown")
        values = set(statuses.values())
        status = values.pop() if len(values) == 1 else "mixed"
        transcript, buffered = parse_exim_client_debug(debug)
        return EximDelivery(
            message_id=message_id,
            status=status,
            recipients=statuses,
            log=own,
            pipelining=pipelining,
            chunking=chunking,
            transcript=transcript,
            pipelined=buffered,
            returncode=returncode,
        )

    # -- log
    def log_text(self) -> str:
        return _read_since(self.log_path, 0)

    def log_offset(self) -> int:
        return _file_size(self.log_path)

    def log_since(self, offset: int) -> str:
        return _read_since(self.log_path, offset)

    def queue(self) -> list[str]:
        """Ids of the messages still in the queue (deferred)."""
        return sorted(p.name[: -len("-H")] for p in (self.base_dir / "spool" / "input").glob("*-H"))


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


# --------------------------------------------------------------------------- OpenSMTPD

# Runs as nobody from OpenSMTPD's mda action, once per recipient: capture.sh DIR (sender and
# recipient come from the MDA's environment: SENDER, RECIPIENT).  NAME.env has "sender" and
# "rcpt" lines; NAME.env appearing means NAME is complete.
_SMTPD_CAPTURE_SH = """\
#!/bin/sh
dir=$1
name=$(date +%s%N)-$$
umask 022
cat >"$dir/.$name.eml" || exit 75
printf 'sender %s\\nrcpt %s\\n' "$SENDER" "$RECIPIENT" >"$dir/.$name.env" || exit 75
mv "$dir/.$name.eml" "$dir/$name.eml" || exit 75
mv "$dir/.$name.env" "$dir/$name.env" || exit 75
exit 0
"""

# OpenSMTPD report-only filter: appends every smtp-in report line it gets to $1.
_SMTPD_REPORT_SH = """\
#!/bin/sh
out=$1
while IFS= read -r line; do
    [ "$line" = "config|ready" ] && break
done
for event in link-connect link-disconnect protocol-client protocol-server; do
    printf 'register|report|smtp-in|%s\\n' "$event"
done
printf 'register|ready\\n'
while IFS= read -r line; do
    printf '%s\\n' "$line" >>"$out"
done
"""

# In a private mount namespace: the instance's spool and /run (smtpd.sock, smtpd.pid) over the
# compiled-in paths, then smtpd in the foreground (-d), verbose, with the SMTP trace.
_SMTPD_RUN_SH = """\
#!/bin/sh
set -e
mount --bind "$1/spool" {spool}
mount --bind "$1/run" /run
exec {smtpd} -d -v -T smtp -f "$1/smtpd.conf"
"""

_SMTPD_MESSAGE_RE = re.compile(r"\bsmtp message msgid=(\w+) size=\d+ nrcpt=(\d+)")
_SMTPD_ENVELOPE_RE = re.compile(r"\bsmtp envelope evpid=(\w+) from=<[^>]*> to=<([^>]*)>")
_SMTPD_RECEIVED_ID_RE = re.compile(rb"^Received: .*?\bid ([0-9a-f]{8})\b", re.DOTALL)


class OpenSMTPD(_Instance):
    """A private OpenSMTPD 6.8.0p2 on ``host:port`` in a temp folder, capturing all it accepts.

    Its defaults: no PIPELINING, no CHUNKING (``8BITMIME ENHANCEDSTATUSCODES SIZE 36700160 DSN
    HELP``), one EHLO per session, a second command in the same read refused with ``500 5.5.1
    Invalid command: Pipelining not supported``.  It runs as ``smtpd -d -v -T smtp`` inside
    ``unshare -m``; its log (:attr:`log_path`) has the ``<<<``/``>>>`` trace.

    Each recipient is delivered separately by an ``mda`` action; :meth:`messages` groups the
    copies of one message (by the queue id of OpenSMTPD's ``Received:`` header) into one
    :class:`CapturedMessage` with all recipients, in RCPT order, once all are delivered.  The
    captured data starts with that ``Received:`` header (the ``Return-Path:`` and
    ``Delivered-To:`` lines the MDA prepends are removed); OpenSMTPD adds ``Date:`` and
    ``Message-ID:`` to a message without them.  ``extra_config`` lines go at the top of
    smtpd.conf.
    """

    _prefix = "smtpguard-opensmtpd-"
    name = "OpenSMTPD"

    def __init__(
        self,
        *,
        extra_config: Sequence[str] = (),
        host: str = "127.0.0.1",
        port: int | None = None,
        hostname: str = "opensmtpd.smtpguard.test",
    ) -> None:
        super().__init__(host=host, port=port)
        self.extra_config = list(extra_config)
        self.hostname = hostname

    @property
    def config_path(self) -> Path:
        return self.base_dir / "smtpd.conf"

    @property
    def log_path(self) -> Path:
        """smtpd's stderr: its log and the -T smtp trace (no timestamps)."""
        return self.base_dir / "smtpd.log"

    @property
    def trace_path(self) -> Path:
        """The report filter's smtp-in events."""
        return self.base_dir / "reports.log"

    def config(self) -> str:
        base = self.base_dir
        listen = f"listen on {self.host} port {self.port} hostname {self.hostname}"
        return "\n".join(
            [
                *self.extra_config,
                f'filter "transcript" proc-exec "/bin/sh {base}/report.sh {self.trace_path}"',
                f'{listen} filter "transcript"',
                'table rejects { "^reject" }',
                'table catchall { "@" = "nobody" }',
                f'action "capture" mda "/bin/sh {base}/capture.sh {self.captured_dir}" '
                "virtual <catchall>",
                "match from src 127.0.0.0/8 for any rcpt-to regex <rejects> reject",
                'match from src 127.0.0.0/8 for any action "capture"',
                "",
            ]
        )

    def _check(self) -> None:
        _check_smtpd()

    def _prepare(self) -> None:
        spool = self.base_dir / "spool"
        spool.mkdir(mode=0o711)
        spool.chmod(0o711)
        (self.base_dir / "run").mkdir()
        smtpd_user = pwd.getpwnam("opensmtpd")
        self.trace_path.touch()
        os.chown(self.trace_path, smtpd_user.pw_uid, smtpd_user.pw_gid)
        for name, text in (
            ("capture.sh", _SMTPD_CAPTURE_SH),
            ("report.sh", _SMTPD_REPORT_SH),
            ("run.sh", _SMTPD_RUN_SH.format(spool=SMTPD_SPOOL, smtpd=SMTPD_BINARY)),
        ):
            (self.base_dir / name).write_text(text)
            (self.base_dir / name).chmod(0o755)
        self.config_path.write_text(self.config())
        self.config_path.chmod(0o644)

    def _command(self) -> list[str]:
        return ["unshare", "-m", "--", "/bin/sh", str(self.base_dir / "run.sh"), str(self.base_dir)]

    @property
    def _stderr_path(self) -> Path:
        return self.log_path  # the report file is the trace

    def _ready(self) -> bool:
        return _listening(self.host, self.port) and "smtpd: setup done" in self.log_text()

    def _startup_output(self) -> str:
        return self.log_text()

    def _parse_trace(self, text: str) -> list[Session]:
        return parse_smtpd_reports(text)

    def queue_files(self) -> list[Path]:
        spool = self.base_dir / "spool"
        return _files_under(spool / "incoming", spool / "queue")

    def _captured(self) -> list[CapturedMessage]:
        """Copies grouped per message; a message is listed once all its recipients are."""
        copies = super()._captured()
        log = self.log_text()
        nrcpt = {m.group(1): int(m.group(2)) for m in _SMTPD_MESSAGE_RE.finditer(log)}
        order: dict[str, list[str]] = {}
        for match in _SMTPD_ENVELOPE_RE.finditer(log):
            order.setdefault(match.group(1)[:8], []).append(match.group(2))
        groups: dict[str, list[CapturedMessage]] = {}
        for copy in copies:
            data = _strip_mda_headers(copy.data)
            found = _SMTPD_RECEIVED_ID_RE.match(data)
            key = found.group(1).decode() if found else copy.name
            groups.setdefault(key, []).append(copy)
        messages = []
        for key, members in groups.items():
            if key in nrcpt and len(members) < nrcpt[key]:
                continue  # some recipients not delivered yet
            recipients = [r for m in members for r in m.recipients]
            rank = {r: i for i, r in enumerate(order.get(key, []))}
            recipients.sort(key=lambda r: rank.get(r, len(rank)))
            first = members[0]
            messages.append(
                CapturedMessage(
                    name=first.name,
                    queue_id=key,
                    sender=first.sender,
                    recipients=recipients,
                    data=_strip_mda_headers(first.data),
                    path=first.path,
                )
            )
        return messages


def _strip_mda_headers(data: bytes) -> bytes:
    """``data`` without the ``Return-Path:``/``Delivered-To:`` lines OpenSMTPD's MDA puts first."""
    while data.startswith((b"Return-Path: ", b"Delivered-To: ")):
        data = data.split(b"\n", 1)[1] if b"\n" in data else b""
    return data


# --------------------------------------------------------------------------- Postfix as a client

_POSTFIX_SMTP_SERVICE = "smtp      unix  -       -       n       -       -       smtp\n"
_POSTFIX_STATUS_RE = re.compile(
    r"^.* postfix/smtp\[\d+\]: (?P<id>[0-9A-F]+): to=<(?P<rcpt>[^>]*)>, .*?"
    r"\bstatus=(?P<status>\w+) (?P<detail>.*)$",
    re.MULTILINE,
)


class PostfixClient(Postfix):
    """Postfix as a sending MTA: a private instance whose ``relayhost`` is ``[host]:port``.

    Messages submitted with :meth:`submit` (``sendmail -C``) go through pickup and qmgr to its
    smtp(8) client, which pipelines MAIL/RCPT/DATA (it never sends BDAT).  The instance still
    has an smtpd listener of its own (on a free port; nothing uses it).  Its log's
    ``status=sent|deferred|bounced`` lines are read by :meth:`deliveries`.  ``extra_main_cf``
    adds or overrides main.cf settings (``debug_peer_list = 127.0.0.1`` logs the dialog).

    ``batch=True`` puts every submitted message on hold (a ``HOLD`` header check) until
    :meth:`release` lets them all go at once, one connection at a time
    (``smtp_destination_concurrency_limit = 1``) with the connection cached for reuse: one
    SMTP session then carries several transactions, as a busy relay's does.
    """

    def __init__(
        self,
        relayhost: tuple[str, int],
        *,
        extra_main_cf: Mapping[str, str] | None = None,
        myhostname: str = "pfclient.smtpguard.test",
        batch: bool = False,
    ) -> None:
        host, port = relayhost
        settings = {
            "relayhost": f"[{host}]:{port}",
            "default_transport": "smtp",
            "relay_transport": "smtp",
            "smtp_tls_security_level": "none",
            "smtp_helo_name": myhostname,
        }
        if batch:
            settings.update(
                {
                    "smtp_destination_concurrency_limit": "1",
                    "initial_destination_concurrency": "1",
                    "smtp_connection_cache_destinations": "$relayhost",
                }
            )
        settings.update(extra_main_cf or {})
        super().__init__(extra_main_cf=settings, myhostname=myhostname)
        self.relayhost = relayhost
        self.batch = batch

    @property
    def _hold_map(self) -> Path:
        return self.config_dir / "hold_all"

    def main_cf(self) -> dict[str, str]:
        settings = super().main_cf()
        if self.batch:
            settings.setdefault("header_checks", f"regexp:{self._hold_map}")
        return settings

    def _write_config(self, nobody_uid: int, nobody_gid: int) -> None:
        super()._write_config(nobody_uid, nobody_gid)
        master = self.config_dir / "master.cf"
        master.write_text(master.read_text() + _POSTFIX_SMTP_SERVICE)
        self._hold_map.write_text("/^/ HOLD batched by the test\n")
        past = time.time() - 60  # see Postfix._write_config
        for path in (master, self._hold_map):
            os.utime(path, (past, past))

    def held(self) -> int:
        """Messages in the hold queue."""
        return sum(len(names) for _root, _dirs, names in os.walk(self.queue_dir / "hold"))

    def release(self, expected: int, timeout: float = 10) -> None:
        """Wait until ``expected`` messages are on hold, then release them all at once."""
        _wait(lambda: self.held() >= expected, timeout, what=f"{expected} held messages")
        result = self.postsuper("-H", "ALL")
        if result.returncode != 0:
            raise PeerError(f"postsuper -H ALL failed: {result.stderr}")
        subprocess.run(
            [find_program("postqueue"), "-c", str(self.config_dir), "-f"],
            capture_output=True,
            timeout=30,
            check=True,
        )

    def submit(
        self, sender: str, recipients: Iterable[str], data: bytes, options: Sequence[str] = ()
    ) -> None:
        """Queue ``data`` (a whole message, LF or CRLF line ends) from ``sender``.

        ``options``: more sendmail(1) options, e.g. ``("-N", "success,failure", "-V", envid,
        "-R", "hdrs", "-B", "8BITMIME")`` for DSN and the body type."""
        result = subprocess.run(
            [
                find_program("sendmail"),
                "-C",
                str(self.config_dir),
                *options,
                "-f",
                sender,
                "--",
                *recipients,
            ],
            input=data,
            capture_output=True,
            timeout=30,
        )
        if result.returncode != 0:
            stderr = result.stderr.decode(errors="replace")
            raise PeerError(f"sendmail exited with {result.returncode}: {stderr}")

    def deliveries(self, since_offset: int = 0) -> dict[str, list[str]]:
        """Recipient -> the smtp client's statuses for it (``sent``, ``deferred``, ``bounced``)
        logged after ``since_offset``, oldest first."""
        found: dict[str, list[str]] = {}
        for match in _POSTFIX_STATUS_RE.finditer(self.log_since(since_offset)):
            found.setdefault(match.group("rcpt"), []).append(match.group("status"))
        return found

    def wait_for_deliveries(
        self, recipients: Iterable[str], since_offset: int = 0, timeout: float = 20
    ) -> dict[str, list[str]]:
        """:meth:`deliveries` once every one of ``recipients`` has a status logged."""
        wanted = set(recipients)
        deadline = time.monotonic() + timeout
        while True:
            found = self.deliveries(since_offset)
            if wanted <= found.keys():
                return found
            if time.monotonic() > deadline:
                raise PeerError(
                    f"no delivery status for {sorted(wanted - found.keys())} within {timeout}s;"
                    f" log:\n{_tail(self.log_since(since_offset))}"
                )
            time.sleep(0.05)
