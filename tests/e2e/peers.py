"""Real peers on loopback for end-to-end tests: a private Postfix, Prometheus, swaks, promtool.

Everything here is plain stdlib code driving the real programs with ``subprocess``; the pytest
fixtures live in ``conftest.py``.  A missing program raises :class:`MissingProgramError` (tests
must fail, not skip: a skipped end-to-end test proves nothing).

Every peer started here is registered and stopped at interpreter exit as a last resort, on top
of the fixtures' own teardown.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Set to 1 to keep the peers' temp folders (config, logs, captured mail) after stop.
KEEP_ENV = "SMTPGUARD_E2E_KEEP"

_EXTRA_PATH = ("/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/lib/postfix/sbin")
_APT_PACKAGE = {
    "postfix": "postfix",
    "postsuper": "postfix",
    "postconf": "postfix",
    "smtp-source": "postfix",
    "smtp-sink": "postfix",
    "swaks": "swaks",
    "prometheus": "prometheus",
    "promtool": "prometheus",
    "haproxy": "haproxy",
}


class PeerError(RuntimeError):
    """A real peer failed to start, to answer or to do what a test waited for."""


class MissingProgramError(PeerError):
    """A program the end-to-end tests need is not installed."""


def find_program(name: str) -> str:
    """Return the absolute path of ``name`` (also searching the sbin folders) or raise."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *_EXTRA_PATH])
    found = shutil.which(name, path=path)
    if found is None:
        package = _APT_PACKAGE.get(name, name)
        raise MissingProgramError(
            f"{name!r} is not installed: the end-to-end tests need it. Run ./test.sh "
            f"(it installs the apt packages) or: apt-get install -y {package}"
        )
    return found


# --------------------------------------------------------------------------- process hygiene

_live: set[Postfix | Prometheus] = set()


@atexit.register
def _stop_all() -> None:
    for peer in list(_live):
        with contextlib.suppress(Exception):
            peer.stop()


def _keep_dirs() -> bool:
    return os.environ.get(KEEP_ENV, "") not in ("", "0")


def _proc_state(pid: int) -> str | None:
    """One-letter state of ``pid`` from /proc, or None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _alive(pid: int) -> bool:
    # Zombies count as dead: PID 1 here does not always reap orphans.
    return _proc_state(pid) not in (None, "Z", "X")


def _pids_matching(
    pgid: int | None, environ_marker: bytes, cmdline_marker: bytes | None = None
) -> list[int]:
    """Live processes in process group ``pgid``, whose environment holds ``environ_marker``, or
    whose command line contains ``cmdline_marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid == os.getpid() or not _alive(pid):
            continue
        try:
            if pgid is not None and os.getpgid(pid) == pgid:
                found.append(pid)
                continue
            env = Path(f"/proc/{pid}/environ").read_bytes()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if cmdline_marker else b""
        except (OSError, ProcessLookupError):
            continue
        if environ_marker in env.split(b"\0") or (cmdline_marker and cmdline_marker in cmdline):
            found.append(pid)
    return found


_OWNER_FILE = "owner.pid"
_TEMP_PREFIXES = ("smtpguard-postfix-", "smtpguard-prometheus-")


def _make_base_dir(prefix: str) -> Path:
    """A temp folder for one peer, tagged with our pid so that a later run can reap it."""
    _reap_orphans()
    base = Path(tempfile.mkdtemp(prefix=prefix))
    (base / _OWNER_FILE).write_text(str(os.getpid()))
    return base


def _release_base_dir(base: Path) -> None:
    if _keep_dirs():
        (base / _OWNER_FILE).unlink(missing_ok=True)
    else:
        shutil.rmtree(base, ignore_errors=True)


def _reap_orphans() -> None:
    """Stop peers left behind by a test run that died without cleaning up (SIGKILL, timeout).

    A peer's folder names the pid of the process that started it; if that process is gone,
    kill what still runs from that folder (Postfix processes carry MAIL_CONFIG=<folder>/etc in
    their environment, Prometheus has the folder on its command line) and remove it.
    """
    for prefix in _TEMP_PREFIXES:
        for owner_file in Path(tempfile.gettempdir()).glob(f"{prefix}*/{_OWNER_FILE}"):
            try:
                owner = int(owner_file.read_text())
            except (OSError, ValueError):
                continue
            if owner == os.getpid() or _alive(owner):
                continue
            base = owner_file.parent
            marker = f"MAIL_CONFIG={base}/etc".encode()
            for pid in _pids_matching(None, marker, f"{base}/".encode()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            shutil.rmtree(base, ignore_errors=True)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _listening(host: str, port: int) -> bool:
    """True if something listens on host:port (read from /proc/net, no connection made)."""
    try:
        packed = socket.inet_pton(socket.AF_INET, host)
        table = "/proc/net/tcp"
        want = "".join(f"{b:02X}" for b in reversed(packed))
    except OSError:
        packed = socket.inet_pton(socket.AF_INET6, host)
        table = "/proc/net/tcp6"
        want = "".join(
            "".join(f"{b:02X}" for b in reversed(packed[i : i + 4])) for i in range(0, 16, 4)
        )
    try:
        lines = Path(table).read_text().splitlines()[1:]
    except OSError:
        return _connectable(host, port)
    for line in lines:
        fields = line.split()
        local, state = fields[1], fields[3]
        addr, _, hexport = local.partition(":")
        if state == "0A" and int(hexport, 16) == port and addr in (want, "0" * len(want)):
            return True
    return False


def _connectable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _wait(
    condition: Callable[[], bool], timeout: float, interval: float = 0.05, what: str = ""
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise PeerError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- Postfix helpers

_DISCONNECT_RE = re.compile(r"\bdisconnect from (?P<client>\S+)(?P<counts>(?: [\w-]+=\S+)*)\s*$")


def parse_disconnect(line: str) -> dict[str, str]:
    """Counters of a Postfix ``disconnect from ...`` log line.

    ``... disconnect from unknown[127.0.0.1]:4321 ehlo=1 mail=1 rcpt=0/1 quit=1 commands=3/4``
    gives ``{'ehlo': '1', 'mail': '1', 'rcpt': '0/1', 'quit': '1', 'commands': '3/4'}``;
    ``ok/total`` values mean some of those commands failed.
    """
    match = _DISCONNECT_RE.search(line.rstrip("\r\n"))
    if match is None:
        raise ValueError(f"not a Postfix disconnect line: {line!r}")
    return dict(item.split("=", 1) for item in match.group("counts").split())


def strip_received(captured: bytes) -> bytes:
    """``captured`` without the one ``Received:`` header (and its folded lines) Postfix prepends."""
    if not captured.startswith(b"Received: "):
        raise ValueError("captured message does not start with a Received: header")
    lines = captured.splitlines(keepends=True)
    end = 1
    while end < len(lines) and lines[end][:1] in (b" ", b"\t"):
        end += 1
    return b"".join(lines[end:])


def body_matches(original: bytes, captured: bytes) -> bool:
    """True if ``captured`` is exactly what Postfix makes of ``original``, and nothing else.

    ``original`` is the message content as the client put it on the wire between DATA and the
    final dot (dot-unstuffed), so it ends with CRLF.  Postfix's copy differs in exactly two
    ways: every CRLF is an LF, and one ``Received:`` header (possibly folded) comes first.
    """
    if not original.endswith(b"\n"):
        raise ValueError("original must be wire content, ending with CRLF")
    try:
        rest = strip_received(captured)
    except ValueError:
        return False
    return rest == original.replace(b"\r\n", b"\n")


@dataclass(frozen=True)
class CapturedMessage:
    """One message as Postfix's pipe(8) transport handed it to the capture script."""

    name: str
    queue_id: str
    sender: str
    recipients: list[str]
    data: bytes
    path: Path = field(repr=False)

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")

    def header(self, name: str) -> str | None:
        """First value of header ``name`` (unfolded), or None."""
        head = self.data.split(b"\n\n", 1)[0].decode("utf-8", errors="replace")
        unfolded = re.sub(r"\n[ \t]+", " ", head)
        for line in unfolded.split("\n"):
            key, sep, value = line.partition(":")
            if sep and key.strip().lower() == name.lower():
                return value.strip()
        return None


# Runs as `nobody` under pipe(8): capture.sh DIR QUEUE_ID SENDER RECIPIENT...
# Writes NAME.eml (the message as Postfix hands it) and then NAME.env (the envelope, one
# "sender ADDR" line and one "rcpt ADDR" line each); .env appearing means NAME is complete.
_CAPTURE_SH = """\
#!/bin/sh
dir=$1 qid=$2 sender=$3
shift 3
name=$(date +%s%N)-$qid
umask 022
cat >"$dir/.$name.eml" || exit 75
{
    printf 'sender %s\\n' "$sender"
    for rcpt in "$@"; do printf 'rcpt %s\\n' "$rcpt"; done
} >"$dir/.$name.env" || exit 75
mv "$dir/.$name.eml" "$dir/$name.eml" || exit 75
mv "$dir/.$name.env" "$dir/$name.env" || exit 75
exit 0
"""

_MASTER_CF = """\
{listen} inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
capture   unix  -       n       n       -       -       pipe
  user=nobody null_sender= argv=/bin/sh {script} {captured} ${{queue_id}} ${{sender}} ${{recipient}}
"""  # noqa: E501

# (folder, group, mode) of Postfix's queue, from /etc/postfix/postfix-files.
_QUEUE_LAYOUT = (
    *((sub, "root", 0o700) for sub in ("active", "bounce", "corrupt", "defer", "deferred")),
    *((sub, "root", 0o700) for sub in ("flush", "hold", "incoming", "private", "saved", "trace")),
    ("maildrop", "postdrop", 0o730),
    ("public", "postdrop", 0o710),
    ("pid", "root", 0o755),
)
_QUEUE_DIRS = ("maildrop", "incoming", "active", "deferred", "hold")


class Captures:
    """Waiting for and clearing what a capturing MTA delivered (Postfix here, Exim and
    OpenSMTPD in mtas.py).  The class provides ``messages()``, ``queue_files()``,
    ``log_text()``, ``captured_dir``, a ``_cache`` dict and a ``name``."""

    name = "MTA"
    captured_dir: Path
    _cache: dict[str, CapturedMessage]

    def messages(self, timeout: float | None = None) -> list[CapturedMessage]:
        raise NotImplementedError

    def queue_files(self) -> list[Path]:
        raise NotImplementedError

    def log_text(self) -> str:
        raise NotImplementedError

    def wait_for_messages(
        self,
        n: int,
        timeout: float = 10,
        where: Callable[[CapturedMessage], bool] | None = None,
    ) -> list[CapturedMessage]:
        """Wait until at least ``n`` captured messages (those passing ``where``) exist."""
        deadline = time.monotonic() + timeout
        while True:
            found = [m for m in self.messages() if where is None or where(m)]
            if len(found) >= n:
                return found
            if time.monotonic() > deadline:
                raise PeerError(
                    f"{len(found)} of {n} messages captured by {self.name} within {timeout}s; "
                    f"queue: {[p.name for p in self.queue_files()]}; log:\n"
                    f"{_tail(self.log_text())}"
                )
            time.sleep(0.05)

    def clear_messages(self) -> None:
        """Delete everything captured so far."""
        for path in self.captured_dir.iterdir():
            path.unlink(missing_ok=True)
        self._cache.clear()


class Postfix(Captures):
    """A private Postfix on ``host:port`` in a temp folder, capturing everything it accepts.

    Relays for every domain from 127.0.0.0/8; each accepted message is delivered once (all
    recipients together) through a pipe(8) transport into :attr:`captured_dir`.  Logs go to
    :attr:`maillog_path`.  ``legacy=True`` accepts bare LF line endings
    (``smtpd_forbid_bare_newline = no``), the smuggling-prone behaviour; the default normalizes
    them (``normalize``), with no exclusions either way.  ``extra_main_cf`` overrides or adds
    main.cf settings, e.g. ``{"smtpd_discard_ehlo_keywords": "chunking"}``.
    """

    name = "Postfix"

    def __init__(
        self,
        *,
        legacy: bool = False,
        extra_main_cf: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        myhostname: str = "upstream.smtpguard.test",
    ) -> None:
        self.legacy = legacy
        self.extra_main_cf = dict(extra_main_cf or {})
        self.host = host
        self.port = port or 0
        self.myhostname = myhostname
        self.base_dir = Path()
        self._master_pid: int | None = None
        self._started = False
        self._cache: dict[str, CapturedMessage] = {}

    # -- paths
    @property
    def config_dir(self) -> Path:
        return self.base_dir / "etc"

    @property
    def queue_dir(self) -> Path:
        return self.base_dir / "spool"

    @property
    def captured_dir(self) -> Path:
        return self.base_dir / "captured"

    @property
    def maillog_path(self) -> Path:
        return self.base_dir / "maillog"

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def main_cf(self) -> dict[str, str]:
        """The main.cf settings this instance runs with."""
        base = str(self.base_dir)
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": f"{base}/data",
            "myhostname": self.myhostname,
            "mydomain": "smtpguard.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": self.host,
            "inet_protocols": "ipv6" if ":" in self.host else "ipv4",
            "mynetworks": "127.0.0.0/8 [::1]/128",
            "relay_domains": "static:ALL",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "default_transport": "capture:capture",
            "relay_transport": "capture:capture",
            "local_transport": "capture:capture",
            "capture_destination_recipient_limit": "10000",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "biff": "no",
            "append_dot_mydomain": "no",
            "readme_directory": "no",
            "smtpd_banner": "$myhostname ESMTP upstream",
            "smtpd_peername_lookup": "no",
            "smtpd_client_port_logging": "yes",
            "smtpd_error_sleep_time": "0",
            "in_flow_delay": "0",
            "local_header_rewrite_clients": "",
            "smtpd_forbid_bare_newline": "no" if self.legacy else "normalize",
            "smtpd_forbid_bare_newline_exclusions": "",
            # Retry a deferred delivery quickly instead of after minutes.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "maillog_file": str(self.maillog_path),
            "maillog_file_prefixes": f"/var, /dev/stdout, {base}",
        }
        settings.update(self.extra_main_cf)
        return settings

    # -- lifecycle
    def start(self) -> Postfix:
        if self._started:
            return self
        postfix = find_program("postfix")
        find_program("postsuper")
        find_program("postconf")
        try:
            nobody = pwd.getpwnam("nobody")
            pwd.getpwnam("postfix")
        except KeyError as exc:
            raise MissingProgramError(f"user {exc} missing: is postfix installed?") from exc
        if os.geteuid() != 0:
            raise PeerError("a private Postfix instance needs root")
        if not self.port:
            self.port = free_port(self.host)

        self.base_dir = _make_base_dir("smtpguard-postfix-")
        self.base_dir.chmod(0o755)  # nobody (the capture script) must reach captured/
        _live.add(self)
        self._started = True
        try:
            self._write_config(nobody.pw_uid, nobody.pw_gid)
            env = dict(os.environ, MAIL_CONFIG=str(self.config_dir))
            result = subprocess.run(
                [postfix, "-c", str(self.config_dir), "start"],
                capture_output=True,
                text=True,
                timeout=60,
                env=env,
            )
            if result.returncode != 0:
                raise PeerError(
                    f"postfix start failed ({result.returncode}): {result.stderr.strip()}\n"
                    f"maillog:\n{_tail(self.log_text())}"
                )
            pid_file = self.queue_dir / "pid" / "master.pid"
            _wait(pid_file.exists, 10, what=f"{pid_file}")
            self._master_pid = int(pid_file.read_text().split()[0])
            _wait(
                lambda: _listening(self.host, self.port),
                10,
                what=f"Postfix smtpd listening on {self.host}:{self.port}",
            )
        except BaseException:
            self.stop()
            raise
        return self

    def _write_config(self, nobody_uid: int, nobody_gid: int) -> None:
        for sub in ("etc", "spool", "data", "captured"):
            (self.base_dir / sub).mkdir()
        shutil.chown(self.base_dir / "data", user="postfix")
        # Lay out the queue as postfix-files says and skip `postfix check` at start through
        # the quick-start file: the check costs ~2 s per instance.
        for sub, group, mode in _QUEUE_LAYOUT:
            path = self.queue_dir / sub
            path.mkdir()
            if sub != "pid":
                shutil.chown(path, user="postfix", group=group)
            path.chmod(mode)
        (self.queue_dir / "quick-start").touch()
        os.chown(self.captured_dir, nobody_uid, nobody_gid)
        script = self.base_dir / "capture.sh"
        script.write_text(_CAPTURE_SH)
        script.chmod(0o755)
        main = "".join(f"{key} = {value}\n" for key, value in self.main_cf().items())
        (self.config_dir / "main.cf").write_text(main)
        host = f"[{self.host}]" if ":" in self.host else self.host
        master = _MASTER_CF.format(
            listen=f"{host}:{self.port}", script=script, captured=self.captured_dir
        )
        (self.config_dir / "master.cf").write_text(master)
        # Postfix re-reads a config file until it is older than ~2 s (in case it is still
        # being edited): backdate ours to save those seconds at start.
        past = time.time() - 60
        for name in ("main.cf", "master.cf"):
            os.utime(self.config_dir / name, (past, past))

    def stop(self, timeout: float = 10) -> None:
        """Stop Postfix, kill leftovers, wait until the port is released, remove the temp dir."""
        if not self._started:
            return
        self._started = False
        marker = f"MAIL_CONFIG={self.config_dir}".encode()
        pgid = self._master_pid
        if pgid is not None and _alive(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pgid, signal.SIGTERM)  # master then terminates its children
        deadline = time.monotonic() + timeout / 2
        while _pids_matching(pgid, marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in _pids_matching(pgid, marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            if self.port:
                _wait(
                    lambda: not _listening(self.host, self.port),
                    timeout / 2,
                    what=f"port {self.host}:{self.port} to be released",
                )
        finally:
            _live.discard(self)
            self._cache.clear()
            _release_base_dir(self.base_dir)

    def __enter__(self) -> Postfix:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- tools
    def postsuper(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``postsuper -c CONFIG ARGS`` (e.g. ``"-d", "ALL"`` to empty the queue)."""
        return subprocess.run(
            [find_program("postsuper"), "-c", str(self.config_dir), *args],
            capture_output=True,
            text=True,
            timeout=30,
        )

    def queue_files(self) -> list[Path]:
        """Queue files not yet delivered (maildrop, incoming, active, deferred, hold)."""
        files: list[Path] = []
        for sub in _QUEUE_DIRS:
            for _root, _dirs, names in os.walk(self.queue_dir / sub):
                files.extend(Path(_root, name) for name in names)
        return files

    def wait_queue_empty(self, timeout: float = 10) -> None:
        try:
            _wait(lambda: not self.queue_files(), timeout, what="the Postfix queue to drain")
        except PeerError as exc:
            raise PeerError(f"{exc}; maillog:\n{_tail(self.log_text())}") from None

    # -- log
    def log_text(self) -> str:
        return self.log_since(0)

    def log_offset(self) -> int:
        """Current size of the maillog: pass it to :meth:`log_since` / :meth:`wait_for_log`."""
        try:
            return self.maillog_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, offset: int) -> str:
        try:
            with self.maillog_path.open("rb") as log:
                log.seek(offset)
                return log.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(
        self, pattern: str, since_offset: int = 0, timeout: float = 10
    ) -> re.Match[str]:
        """First match of regex ``pattern`` (MULTILINE) in the log after ``since_offset``."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log_since(since_offset))
            if match is not None:
                return match
            if time.monotonic() > deadline:
                raise PeerError(
                    f"no {pattern!r} in the Postfix log within {timeout}s; log since offset:\n"
                    f"{_tail(self.log_since(since_offset))}"
                )
            time.sleep(0.05)

    def wait_for_disconnect(
        self, since_offset: int, timeout: float = 10, client_port: int | None = None
    ) -> dict[str, str]:
        """Counters (see :func:`parse_disconnect`) of the first smtpd ``disconnect from`` line
        after ``since_offset``; with ``client_port``, of that client's session only (the log
        names the client as ``unknown[127.0.0.1]:PORT``)."""
        port = rf":{client_port}" if client_port is not None else r"(?::\d+)?"
        pattern = rf"^.*\bdisconnect from [^\s\[]*\[[^\]]*\]{port} .*$"
        match = self.wait_for_log(pattern, since_offset, timeout)
        return parse_disconnect(match.group(0))

    # -- captured mail
    def messages(self, timeout: float | None = None) -> list[CapturedMessage]:
        """Captured messages, oldest delivery first.

        With ``timeout``, first wait (up to that long) until the queue is empty, i.e. every
        message Postfix has accepted so far has been delivered.
        """
        if timeout is not None:
            self.wait_queue_empty(timeout)
        names = sorted(n for n in os.listdir(self.captured_dir) if n.endswith(".env"))
        found = []
        for name in names:
            if name.startswith("."):
                continue  # ".NAME.env" is still being written: only "NAME.env" is complete
            if name not in self._cache:
                self._cache[name] = _read_captured(self.captured_dir / name)
            found.append(self._cache[name])
        return found


def _read_captured(env_path: Path) -> CapturedMessage:
    sender = ""
    recipients = []
    for line in env_path.read_text().splitlines():
        kind, _, value = line.partition(" ")
        if kind == "sender":
            sender = value
        elif kind == "rcpt":
            recipients.append(value)
    name = env_path.stem
    return CapturedMessage(
        name=name,
        queue_id=name.split("-", 1)[1],
        sender=sender,
        recipients=recipients,
        data=env_path.with_suffix(".eml").read_bytes(),
        path=env_path.with_suffix(".eml"),
    )


# --------------------------------------------------------------------------- Prometheus


class Prometheus:
    """A throw-away Prometheus scraping ``targets`` ("host:port", path /metrics) every second.

    ``rule_files`` are loaded as recording/alerting rule files (evaluated every second).
    """

    def __init__(
        self,
        targets: Iterable[str],
        *,
        rule_files: Iterable[str | os.PathLike[str]] = (),
        scrape_interval: str = "1s",
        evaluation_interval: str = "1s",
        metrics_path: str = "/metrics",
        job_name: str = "smtpguard",
        host: str = "127.0.0.1",
        port: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.targets = list(targets)
        self.rule_files = [Path(p).resolve() for p in rule_files]
        self.scrape_interval = scrape_interval
        self.evaluation_interval = evaluation_interval
        self.metrics_path = metrics_path
        self.job_name = job_name
        self.host = host
        self.port = port or 0
        self.extra_args = list(extra_args)
        self.base_dir = Path()
        self._proc: subprocess.Popen[bytes] | None = None
        self._started = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "prometheus.log"

    def config(self) -> dict[str, Any]:
        return {
            "global": {
                "scrape_interval": self.scrape_interval,
                "scrape_timeout": self.scrape_interval,
                "evaluation_interval": self.evaluation_interval,
            },
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [
                {
                    "job_name": self.job_name,
                    "metrics_path": self.metrics_path,
                    "static_configs": [{"targets": self.targets}],
                }
            ],
        }

    def start(self, timeout: float = 30) -> Prometheus:
        if self._started:
            return self
        binary = find_program("prometheus")
        if not self.port:
            self.port = free_port(self.host)
        self.base_dir = _make_base_dir("smtpguard-prometheus-")
        self._started = True
        _live.add(self)
        try:
            config = self.base_dir / "prometheus.yml"
            config.write_text(json.dumps(self.config(), indent=2))  # JSON is YAML
            with self.log_path.open("wb") as log:
                self._proc = subprocess.Popen(
                    [
                        binary,
                        f"--config.file={config}",
                        f"--storage.tsdb.path={self.base_dir / 'data'}",
                        f"--web.listen-address={self.host}:{self.port}",
                        *self.extra_args,
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            deadline = time.monotonic() + timeout
            while not self._ready():
                if self._proc.poll() is not None:
                    raise PeerError(
                        f"prometheus exited with {self._proc.returncode}:\n{_tail(self.log())}"
                    )
                if time.monotonic() > deadline:
                    raise PeerError(f"prometheus not ready within {timeout}s:\n{_tail(self.log())}")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """Stop Prometheus (SIGTERM, then SIGKILL after 10 s) and remove its temp dir."""
        if not self._started:
            return
        self._started = False
        proc, self._proc = self._proc, None
        try:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        finally:
            _live.discard(self)
            _release_base_dir(self.base_dir)

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- HTTP API
    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>`` and return its ``data`` (raises PeerError on an API error)."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
            raise PeerError(f"{url}: HTTP {exc.code}: {body.get('error', body)}") from None
        if body.get("status") != "success":
            raise PeerError(f"{url}: {body}")
        return body["data"]

    def query(self, promql: str) -> list[Any]:
        """Instant query: the ``result`` list (for a vector: ``{"metric":..,"value":[t,"v"]}``)."""
        result = self.api("query", query=promql)["result"]
        return list(result)

    def value(self, promql: str) -> float | None:
        """The value of a query returning one sample (or a scalar); None if empty."""
        data = self.api("query", query=promql)
        result = data["result"]
        if data["resultType"] in ("scalar", "string"):
            return float(result[1])
        if not result:
            return None
        if len(result) > 1:
            raise PeerError(f"{promql!r} returned {len(result)} series, expected one: {result}")
        return float(result[0]["value"][1])

    def wait_for(
        self,
        promql: str,
        predicate: Callable[[list[Any]], bool] | None = None,
        timeout: float = 20,
    ) -> list[Any]:
        """Poll ``promql`` until ``predicate(result)`` (default: non-empty) holds; return it."""
        check = predicate or bool
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if check(result):
                return result
            if time.monotonic() > deadline:
                raise PeerError(
                    f"{promql!r} did not satisfy the predicate within {timeout}s; last result: "
                    f"{result}; targets: {self.target_health()}"
                )
            time.sleep(0.2)

    def target_health(self) -> list[dict[str, str]]:
        """[{url, health, lastError}] of the active scrape targets."""
        return [
            {"url": t["scrapeUrl"], "health": t["health"], "lastError": t["lastError"]}
            for t in self.api("targets")["activeTargets"]
        ]

    def alerts(self) -> list[dict[str, Any]]:
        """Active (pending or firing) alerts."""
        return list(self.api("alerts")["alerts"])

    def rules(self) -> list[dict[str, Any]]:
        return list(self.api("rules")["groups"])


# --------------------------------------------------------------------------- CLI tools


def swaks(
    *args: str, timeout: float = 60, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run /usr/bin/swaks with ``args``; output is captured as text, the exit code not checked."""
    return subprocess.run(
        [find_program("swaks"), *args],
        input=input,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        stdin=None if input is not None else subprocess.DEVNULL,
    )


def promtool(
    *args: str, input: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run promtool with ``args`` (e.g. ``"check", "metrics"`` with the exposition on stdin)."""
    return subprocess.run(
        [find_program("promtool"), *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=None if input is not None else subprocess.DEVNULL,
    )


def promtool_check_metrics(exposition: str) -> subprocess.CompletedProcess[str]:
    """``promtool check metrics`` on ``exposition`` (exit 0: clean; lint findings on stderr)."""
    return promtool("check", "metrics", input=exposition)
