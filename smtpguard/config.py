"""Configuration: YAML loaded once into frozen, validated dataclasses.

Every error names the key (dotted path) and the problem, e.g.
``listen[1]: port must be 1-65535, got 70000``.  The rest of the code never
sees raw YAML.
"""

from __future__ import annotations

import ipaddress
import os
import pathlib
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from . import tlsctx
from .clientrates import RateSettings
from .protocol import SessionOptions
from .protocol.options import AnnotateMode
from .protocol.policy import ALLOWED, Action, Policy, PolicyMode


class ConfigError(Exception):
    """A configuration problem: ``key`` names where, the message says what."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


@dataclass(frozen=True, slots=True)
class Address:
    """A host and port; ``host`` is bare (no brackets) for IPv6."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Listener:
    """One listening address and how clients arrive on it."""

    address: Address
    #: "none" (plaintext, STARTTLS if configured) or "implicit" (port 465 style).
    tls: str = "none"
    #: Require a PROXY v1/v2 header from a trusted load balancer.
    proxy_protocol: bool = False
    #: Networks allowed to send a PROXY header (others are turned away).
    trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    #: This listener's own upstreams (failover order); empty: the global ones.
    upstreams: tuple[Address, ...] = ()


@dataclass(frozen=True, slots=True)
class TLSSettings:
    """TLS towards clients (STARTTLS and implicit TLS)."""

    certificate: pathlib.Path
    key: pathlib.Path
    #: "TLSv1.2" or "TLSv1.3".
    min_version: str = "TLSv1.2"
    #: OpenSSL cipher string for TLS 1.2 (TLS 1.3 suites are OpenSSL's defaults);
    #: None: Mozilla's intermediate profile.
    ciphers: str | None = None
    #: Key-exchange groups, in order of preference (OpenSSL names).
    groups: tuple[str, ...] = tlsctx.DEFAULT_GROUPS


@dataclass(frozen=True, slots=True)
class Timeouts:
    """RFC 5321 4.5.3.2 timeouts, in seconds."""

    connect_seconds: float = 30.0
    #: Waiting for the upstream's greeting (4.5.3.2.1: 5 minutes).
    greeting_seconds: float = 300.0
    #: Waiting for replies to MAIL, RCPT and other commands (5 minutes).
    command_reply_seconds: float = 300.0
    #: Waiting for the 354 after DATA (2 minutes).
    data_init_seconds: float = 120.0
    #: Waiting for the reply after the final dot (10 minutes).
    data_end_seconds: float = 600.0
    #: A client's next complete command (server timeout: 5 minutes).
    client_command_seconds: float = 300.0
    #: A client's next chunk of DATA body (3 minutes per block).
    client_data_seconds: float = 180.0


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """The ``store`` section: Redis shared by every worker and instance (store.py)."""

    #: ``redis://host:port/db``, ``rediss://...`` or ``unix:///path``; None: no store.
    redis: str | None = None
    #: Or Redis Sentinel: the monitored service's name and the sentinels
    #: (the primary is asked of them, again after a failover).
    sentinel_service: str | None = None
    sentinel_nodes: tuple[Address, ...] = ()
    sentinel_db: int = 0
    timeout_seconds: float = 0.5
    retry_seconds: float = 2.0
    key_prefix: str = "smtpguard:"

    @property
    def configured(self) -> bool:
        return self.redis is not None or self.sentinel_service is not None


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated configuration."""

    listen: tuple[Address, ...]
    #: None: start the embedded sink and relay to it.
    upstream: Address | None
    sink_directory: pathlib.Path
    metrics_listen: Address | None
    session: SessionOptions
    timeouts: Timeouts = field(default_factory=Timeouts)
    log_level: str = "info"
    #: "logfmt" or "json"
    log_format: str = "logfmt"
    #: postscreen-style greet_wait: listen for early talkers before connecting upstream.
    greet_wait_seconds: float = 0.0
    #: "on_command": smtpguard greets and connects the upstream at the client's
    #: first command (postscreen); "on_accept": at once, relaying its greeting.
    upstream_connect: str = "on_command"
    #: The 220 text smtpguard greets with (on_command); None: the upstream's
    #: own, as last seen (until then "<hostname> ESMTP").
    banner: str | None = None
    #: Sessions one upstream address may hold at once (0: no cap); split
    #: evenly across workers.  Clients beyond it wait, FIFO, up to
    #: ``upstream_queue_seconds``, then get 421 4.3.2.
    upstream_max_sessions: int = 0
    upstream_queue_seconds: float = 30.0
    #: Per-client connection rate and penalty box (see clientrates.py).
    rates: RateSettings = field(default_factory=RateSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    max_connections: int = 10000
    max_connections_per_client: int = 50
    #: Connection limits only count (``policy.mode: observe``).
    connections_observe: bool = False
    #: Every listener with its options (``listen`` holds their addresses).
    listeners: tuple[Listener, ...] = ()
    tls: TLSSettings | None = None
    #: How the upstream learns the real client: "none", "proxy_v1",
    #: "proxy_v2" or "xclient".
    upstream_identity: str = "none"
    #: Every upstream, for failover (``upstream`` is the first).
    upstreams: tuple[Address, ...] = ()
    #: "ordered": the first that answers; "round_robin": start one further each time.
    upstream_selection: str = "ordered"
    #: TLS from smtpguard to the upstream: "none", "opportunistic" or "required".
    upstream_tls: str = "none"
    upstream_tls_ca_file: str | None = None
    #: Name to verify the upstream's certificate against (default: its host).
    upstream_tls_server_name: str | None = None
    #: TLS 1.2 ciphers and groups towards the upstream (None: intermediate).
    upstream_tls_ciphers: str | None = None
    upstream_tls_groups: tuple[str, ...] = tlsctx.DEFAULT_GROUPS
    #: Worker processes sharing the listening sockets (1: no supervisor).  A
    #: config file without ``workers`` gets one per core (see :func:`cores`).
    workers: int = 1
    #: SIGTERM: how long sessions in flight may take before they get 421 4.3.2.
    shutdown_grace_seconds: float = 30.0


DEFAULT_HELP = (
    "smtpguard: SMTP proxy in front of this site's mail server.",
    "Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT HELP VRFY EXPN AUTH",
    "For more, use HELP <command>.",
)
DEFAULT_HELP_TOPICS = {
    "HELO": ("HELO <hostname>: introduce yourself (no extensions).",),
    "EHLO": ("EHLO <hostname>: introduce yourself and list the extensions.",),
    "MAIL": ("MAIL FROM:<sender> [parameters]: start a mail transaction (after EHLO/HELO).",),
    "RCPT": ("RCPT TO:<recipient> [parameters]: add a recipient (after MAIL).",),
    "DATA": ("DATA: send the message, ending with <CRLF>.<CRLF> (after RCPT).",),
    "BDAT": ("BDAT <size> [LAST]: send a message chunk of <size> octets (after RCPT).",),
    "RSET": ("RSET: abort the current mail transaction.",),
    "NOOP": ("NOOP: do nothing.",),
    "QUIT": ("QUIT: end the session.",),
    "VRFY": ("VRFY <address>: verify an address.",),
    "EXPN": ("EXPN <list>: expand a mailing list.",),
    "AUTH": ("AUTH <mechanism> [initial-response]: authenticate (after EHLO).",),
    "HELP": ("HELP [command]: this text.",),
}

_TOP_KEYS = {
    "hostname",
    "listen",
    "upstream",
    "sink",
    "metrics",
    "help",
    "pipelining",
    "ehlo",
    "limits",
    "timeouts",
    "log",
    "annotate",
    "policy",
    "tls",
    "auth",
    "upstream_identity",
    "shutdown_grace_seconds",
    "upstream_selection",
    "upstream_tls",
    "workers",
    "upstream_connect",
    "banner",
    "upstream_limits",
    "rates",
    "penalty_box",
    "store",
    "commands",
    "body",
}


def parse_address(key: str, value: object, default_port: int | None = None) -> Address:
    """Parse ``host:port`` or ``[v6]:port``."""
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"must be a 'host:port' string, got {value!r}")
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(key, f"bad IPv6 address {value!r}; write [addr]:port")
        port_text = rest[1:]
        try:
            socket.inet_pton(socket.AF_INET6, host)
        except OSError:
            raise ConfigError(key, f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            host, port_text = value, ""
        if ":" in host:
            raise ConfigError(key, f"IPv6 addresses need brackets: [addr]:port, got {value!r}")
    if not port_text:
        if default_port is None:
            raise ConfigError(key, f"missing port in {value!r}")
        return Address(host, default_port)
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(key, f"port must be 0-65535, got {port_text!r}")
    if not host:
        raise ConfigError(key, f"missing host in {value!r}")
    return Address(host, int(port_text))


def _section(raw: Mapping[str, Any], key: str, allowed: set[str]) -> Mapping[str, Any]:
    value = raw.get(key, {})
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"must be a mapping, got {type(value).__name__}")
    for k in value:
        if k not in allowed:
            raise ConfigError(f"{key}.{k}", f"unknown key (known: {', '.join(sorted(allowed))})")
    return value


def _bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false, got {value!r}")
    return value


def _number(key: str, value: object, minimum: float, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(key, f"must be a number, got {value!r}")
    if integer and not isinstance(value, int):
        raise ConfigError(key, f"must be a whole number, got {value!r}")
    if value < minimum:
        raise ConfigError(key, f"must be at least {minimum:g}, got {value!r}")
    return value


def _lines(key: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = value.splitlines()
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(key, "must be a non-empty string or list of strings")
    for line in value:
        if "\r" in line or "\n" in line or len(line) > 400:
            raise ConfigError(key, "each line must be one line of at most 400 characters")
    return tuple(value)


def cores() -> int:
    """The cores this process may run on (its CPU affinity, as a container's
    cpuset limits it), at least 1."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def _workers(value: object) -> int:
    """``workers``: a count, or ``auto`` (the default) for one per core."""
    if value == "auto":
        return cores()
    number = int(_number("workers", value, 1, True))
    if number > 256:
        raise ConfigError("workers", f"must be at most 256, got {number}")
    return number


def _listener(key: str, value: object) -> Listener:
    """``host:port``, or a mapping with ``address``, ``tls``, ``proxy_protocol``,
    ``trusted`` and ``upstream`` (this listener's own, one or a list)."""
    if not isinstance(value, Mapping):
        return Listener(parse_address(key, value))
    for k in value:
        if k not in ("address", "tls", "proxy_protocol", "trusted", "upstream"):
            raise ConfigError(
                f"{key}.{k}",
                "unknown key (known: address, proxy_protocol, tls, trusted, upstream)",
            )
    address = parse_address(f"{key}.address", value.get("address"))
    tls = value.get("tls", "none")
    if tls not in ("none", "implicit"):
        raise ConfigError(f"{key}.tls", f"must be 'none' or 'implicit', got {tls!r}")
    proxy = _bool(f"{key}.proxy_protocol", value.get("proxy_protocol", False))
    trusted_raw = value.get("trusted", ["127.0.0.0/8", "::1/128"] if proxy else [])
    if not isinstance(trusted_raw, list):
        raise ConfigError(f"{key}.trusted", "must be a list of networks (CIDR)")
    trusted = []
    for i, net in enumerate(trusted_raw):
        try:
            trusted.append(ipaddress.ip_network(str(net), strict=False))
        except ValueError:
            raise ConfigError(f"{key}.trusted[{i}]", f"not a network: {net!r}") from None
    upstreams = _upstreams(f"{key}.upstream", value["upstream"]) if "upstream" in value else ()
    return Listener(address, tls, proxy, tuple(trusted), upstreams)


def _upstreams(key: str, value: object) -> tuple[Address, ...]:
    """``upstream``: one ``host:port`` (port 25 by default) or a list (failover order)."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ConfigError(key, "needs at least one address (or leave it out)")
    out: list[Address] = []
    for i, item in enumerate(items):
        item_key = f"{key}[{i}]" if isinstance(value, list) else key
        address = parse_address(item_key, item, default_port=25)
        if address.port == 0:
            raise ConfigError(item_key, "port 0 is not a port one can connect to")
        out.append(address)
    return tuple(out)


def _tls(raw: Mapping[str, Any]) -> TLSSettings | None:
    section = _section(raw, "tls", {"certificate", "key", "min_version", "ciphers", "groups"})
    if not section:
        return None
    paths = {}
    for name in ("certificate", "key"):
        value = section.get(name)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"tls.{name}", "must be the path of a PEM file")
        path = pathlib.Path(value)
        if not path.is_file():
            raise ConfigError(f"tls.{name}", f"no such file: {value}")
        paths[name] = path
    min_version = section.get("min_version", "TLSv1.2")
    if min_version not in ("TLSv1.2", "TLSv1.3"):
        raise ConfigError("tls.min_version", f"must be TLSv1.2 or TLSv1.3, got {min_version!r}")
    ciphers = _ciphers("tls.ciphers", section.get("ciphers"))
    groups = _groups("tls.groups", section.get("groups"))
    settings = TLSSettings(paths["certificate"], paths["key"], min_version, ciphers, groups)
    try:
        server_context(settings)
    except tlsctx.TLSSetupError as exc:
        raise ConfigError(exc.key, exc.problem) from None
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError("tls", f"cannot load certificate and key: {exc}") from None
    return settings


def _ciphers(key: str, value: object) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(key, "must be an OpenSSL cipher string")
    return value


def _groups(key: str, value: object) -> tuple[str, ...]:
    """A list of group names, or one colon-separated string (OpenSSL's form)."""
    if value is None:
        return tlsctx.DEFAULT_GROUPS
    items = value.split(":") if isinstance(value, str) else value
    if (
        not isinstance(items, list | tuple)
        or not items
        or not all(isinstance(g, str) and g.strip() for g in items)
    ):
        raise ConfigError(key, "must be a list of group names, e.g. [X25519, P-256, P-384]")
    return tuple(g.strip() for g in items)


def _store(raw: Mapping[str, Any]) -> StoreSettings:
    store = _section(
        raw, "store", {"redis", "sentinel", "timeout_seconds", "retry_seconds", "key_prefix"}
    )
    url = store.get("redis")
    if url is not None:
        schemes = ("redis://", "rediss://", "unix://")
        if not isinstance(url, str) or not url.startswith(schemes) or len(url) <= 8:
            raise ConfigError(
                "store.redis", f"must be a redis://, rediss:// or unix:// URL, got {url!r}"
            )
    try:
        sentinel = _section(store, "sentinel", {"service", "nodes", "db"})
    except ConfigError as error:  # the nested section's key, named in full
        raise ConfigError(f"store.{error.key}", error.problem) from None
    service = sentinel.get("service")
    nodes: tuple[Address, ...] = ()
    if sentinel:
        if url is not None:
            raise ConfigError("store.sentinel", "give store.redis or store.sentinel, not both")
        if not isinstance(service, str) or not service or any(c.isspace() for c in service):
            raise ConfigError(
                "store.sentinel.service", f"must be the monitored service's name, got {service!r}"
            )
        listed = sentinel.get("nodes")
        if not isinstance(listed, list) or not listed:
            raise ConfigError("store.sentinel.nodes", "must be a list of 'host:port' sentinels")
        nodes = tuple(
            parse_address(f"store.sentinel.nodes[{i}]", node, 26379)
            for i, node in enumerate(listed)
        )
    prefix = store.get("key_prefix", "smtpguard:")
    if not isinstance(prefix, str) or any(c in prefix for c in "{} \r\n"):
        raise ConfigError(
            "store.key_prefix", f"must be a string without braces or spaces, got {prefix!r}"
        )
    return StoreSettings(
        redis=url,
        sentinel_service=service if sentinel else None,
        sentinel_nodes=nodes,
        sentinel_db=int(_number("store.sentinel.db", sentinel.get("db", 0), 0, True)),
        timeout_seconds=_number("store.timeout_seconds", store.get("timeout_seconds", 0.5), 0.001),
        retry_seconds=_number("store.retry_seconds", store.get("retry_seconds", 2), 0.01),
        key_prefix=prefix,
    )


def _rates(raw: Mapping[str, Any]) -> RateSettings:
    rates = _section(
        raw,
        "rates",
        {
            "connections_per_minute",
            "messages_per_minute",
            "recipients_per_minute",
            "ipv4_prefix",
            "ipv6_prefix",
        },
    )
    box = _section(raw, "penalty_box", {"violations", "window_seconds", "seconds", "reply"})

    def whole(key: str, value: object, low: int, high: int | None = None) -> int:
        number = int(_number(key, value, low, True))
        if high is not None and number > high:
            raise ConfigError(key, f"must be at most {high}, got {number}")
        return number

    reply = box.get("reply", 421)
    if not isinstance(reply, int) or isinstance(reply, bool) or reply not in (421, 554):
        raise ConfigError("penalty_box.reply", f"must be 421 or 554, got {reply!r}")
    return RateSettings(
        connections_per_minute=whole(
            "rates.connections_per_minute", rates.get("connections_per_minute", 0), 0
        ),
        messages_per_minute=whole(
            "rates.messages_per_minute", rates.get("messages_per_minute", 0), 0
        ),
        recipients_per_minute=whole(
            "rates.recipients_per_minute", rates.get("recipients_per_minute", 0), 0
        ),
        ipv4_prefix=whole("rates.ipv4_prefix", rates.get("ipv4_prefix", 32), 0, 32),
        ipv6_prefix=whole("rates.ipv6_prefix", rates.get("ipv6_prefix", 128), 0, 128),
        penalty_violations=whole("penalty_box.violations", box.get("violations", 0), 0),
        penalty_window_seconds=_number(
            "penalty_box.window_seconds", box.get("window_seconds", 60), 0.001
        ),
        penalty_seconds=_number("penalty_box.seconds", box.get("seconds", 600), 0),
        penalty_reply=reply,
    )


def server_context(settings: TLSSettings) -> ssl.SSLContext:
    """The server-side context for client TLS (see :mod:`.tlsctx`)."""
    return tlsctx.server_context(
        str(settings.certificate),
        str(settings.key),
        min_version=settings.min_version,
        ciphers=settings.ciphers,
        groups=settings.groups,
    )


#: Verbs ``commands.refuse`` may not name: the session cannot go without them.
ESSENTIAL_VERBS = frozenset(
    {"EHLO", "HELO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "QUIT", "STARTTLS", "AUTH"}
)


def _refused_commands(raw: Mapping[str, Any]) -> frozenset[bytes]:
    """``commands.refuse``: verbs answered 502 5.5.1 locally (VRFY, EXPN, debug verbs)."""
    section = _section(raw, "commands", {"refuse"})
    listed = section.get("refuse", [])
    if not isinstance(listed, list):
        raise ConfigError("commands.refuse", f"must be a list of verbs, got {listed!r}")
    verbs = set()
    for i, verb in enumerate(listed):
        key = f"commands.refuse[{i}]"
        if not isinstance(verb, str) or not verb.isascii() or not verb.isalnum():
            raise ConfigError(key, f"must be a command verb (letters and digits), got {verb!r}")
        if verb.upper() in ESSENTIAL_VERBS:
            raise ConfigError(key, f"{verb.upper()} cannot be refused: SMTP needs it")
        verbs.add(verb.upper().encode("ascii"))
    return frozenset(verbs)


def _eight_bit(raw: Mapping[str, Any]) -> str:
    """``body.eight_bit``: pass (default) or reject, for an upstream without 8BITMIME."""
    value = _section(raw, "body", {"eight_bit"}).get("eight_bit", "pass")
    if value not in ("pass", "reject"):
        raise ConfigError("body.eight_bit", f"must be 'pass' or 'reject', got {value!r}")
    return str(value)


def _policy(raw: Mapping[str, Any], limits: Mapping[str, Any]) -> tuple[Policy, float]:
    """``policy:`` and the limits it enforces; ``mode: observe`` turns every action to observe."""
    section = _section(raw, "policy", {"mode", "greet_wait_seconds", *(d.value for d in ALLOWED)})
    mode = section.get("mode", PolicyMode.ENFORCE)
    if mode not in tuple(PolicyMode):
        raise ConfigError("policy.mode", f"must be 'observe' or 'enforce', got {mode!r}")
    observe = PolicyMode(mode) is PolicyMode.OBSERVE
    defaults = Policy()
    actions: dict[str, Any] = {}
    for defence, allowed in ALLOWED.items():
        key = defence.value
        action = section.get(key, getattr(defaults, key))
        if action not in allowed:
            raise ConfigError(
                f"policy.{key}", f"must be one of {', '.join(allowed)}, got {action!r}"
            )
        actions[key] = Action.OBSERVE if observe else Action(action)
    greet_wait = _number("policy.greet_wait_seconds", section.get("greet_wait_seconds", 0), 0)

    def limit(key: str, default: int) -> int:
        return int(_number(f"limits.{key}", limits.get(key, default), 0, True))

    policy = Policy(
        max_message_bytes=limit("max_message_bytes", 0),
        max_text_line_bytes=limit("max_text_line_bytes", 0),
        max_recipients=limit("max_recipients", defaults.max_recipients),
        max_unknown_commands=limit("max_unknown_commands", defaults.max_unknown_commands),
        hard_error_limit=limit("hard_error_limit", defaults.hard_error_limit),
        observe_limits=observe,
        refused_commands=_refused_commands(raw),
        reject_eight_bit=_eight_bit(raw) == "reject" and not observe,
        **actions,
    )
    return policy, float(greet_wait)


def load(raw: object, base: pathlib.Path | None = None) -> Config:
    """Validate parsed YAML (a mapping) into a :class:`Config`.

    Relative paths (``sink.directory``) are taken from ``base``, by default
    the current directory.  Each section has a parser of its own; they run
    in a fixed order, so that of two bad keys the same one is reported.
    """
    raw = _top_level(raw)
    base = base or pathlib.Path.cwd()
    hostname = _hostname(raw)
    listeners = _listeners(raw)
    tls = _tls(raw)
    if tls is None and any(listener.tls == "implicit" for listener in listeners):
        raise ConfigError("tls", "an implicit TLS listener needs tls.certificate and tls.key")
    auth = _section(raw, "auth", {"require_tls"})
    auth_require_tls = _bool("auth.require_tls", auth.get("require_tls", True))
    identity = _choice(
        raw, "upstream_identity", "none", ("none", "proxy_v1", "proxy_v2", "xclient")
    )
    up_raw = raw.get("upstream")
    upstreams = _upstreams("upstream", up_raw) if up_raw is not None else ()
    upstream_tls = _upstream_tls(raw)
    connect_mode = _choice(raw, "upstream_connect", "on_command", ("on_command", "on_accept"))
    banner = _banner(raw)
    max_sessions, queue_seconds = _upstream_limits(raw)
    rates = _rates(raw)
    store = _store(raw)
    selection = _choice(raw, "upstream_selection", "ordered", ("ordered", "round_robin"))
    sink_dir = _sink_directory(raw)
    metrics_listen = _metrics_listen(raw)
    help_ = _section(raw, "help", {"local", "text", "topics"})
    topics = _help_topics(help_)
    pipelining = _section(raw, "pipelining", {"offer", "upstream"})
    upstream_mode = _choice(pipelining, "upstream", "auto", ("auto", "serial"), "pipelining.")
    ehlo = _section(raw, "ehlo", {"discard_keywords", "chunking"})
    discard = _discard_keywords(ehlo)
    limits = _section(raw, "limits", _LIMITS_KEYS)
    policy, greet_wait = _policy(raw, limits)
    max_connections, max_per_client = _connection_limits(limits)
    timeouts_raw = _section(raw, "timeouts", set(Timeouts.__dataclass_fields__))
    timeouts = Timeouts(**{k: _number(f"timeouts.{k}", v, 0.001) for k, v in timeouts_raw.items()})
    log_level, log_format = _log(raw)
    annotate_mode, header = _annotate(raw)
    help_local = _bool("help.local", help_.get("local", True))
    help_text = _lines("help.text", help_.get("text", list(DEFAULT_HELP)))
    offer_pipelining = _bool("pipelining.offer", pipelining.get("offer", True))
    chunking = _bool("ehlo.chunking", ehlo.get("chunking", True))
    max_line_bytes, max_pipelined = _line_limits(limits)
    session = SessionOptions(
        tls_offered=tls is not None,
        auth_require_tls=auth_require_tls,
        policy=policy,
        annotate=AnnotateMode(annotate_mode),
        annotate_header=header,
        hostname=hostname,
        help_local=help_local,
        help_text=help_text,
        help_topics=topics,
        offer_pipelining=offer_pipelining,
        upstream_pipelining=upstream_mode == "auto",
        chunking=chunking,
        # A refused verb's EHLO keyword goes too (VRFY, EXPN, HELP, ETRN).
        discard_keywords=frozenset(k.upper() for k in discard)
        | {v.decode() for v in policy.refused_commands},
        max_line_bytes=max_line_bytes,
        max_pipelined_commands=max_pipelined,
    )
    return Config(
        listen=tuple(listener.address for listener in listeners),
        upstream=upstreams[0] if upstreams else None,
        upstreams=upstreams,
        workers=_workers(raw.get("workers", "auto")),
        **upstream_tls,
        upstream_selection=selection,
        sink_directory=(base / sink_dir).resolve(),
        metrics_listen=metrics_listen,
        session=session,
        timeouts=timeouts,
        log_level=log_level,
        log_format=log_format,
        greet_wait_seconds=greet_wait,
        upstream_connect=connect_mode,
        banner=banner,
        upstream_max_sessions=max_sessions,
        rates=rates,
        store=store,
        upstream_queue_seconds=queue_seconds,
        max_connections=max_connections,
        max_connections_per_client=max_per_client,
        connections_observe=policy.observe_limits,
        listeners=listeners,
        tls=tls,
        upstream_identity=identity,
        shutdown_grace_seconds=_number(
            "shutdown_grace_seconds", raw.get("shutdown_grace_seconds", 30), 0
        ),
    )


_LIMITS_KEYS = {
    "max_line_bytes",
    "max_pipelined_commands",
    "max_message_bytes",
    "max_recipients",
    "max_unknown_commands",
    "hard_error_limit",
    "max_connections",
    "max_connections_per_client",
    "max_text_line_bytes",
}


def _top_level(raw: object) -> Mapping[str, Any]:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError("(top level)", "must be a mapping of keys")
    for k in raw:
        if k not in _TOP_KEYS:
            raise ConfigError(str(k), f"unknown key (known: {', '.join(sorted(_TOP_KEYS))})")
    return raw


def _choice(
    section: Mapping[str, Any], key: str, default: str, allowed: tuple[str, ...], prefix: str = ""
) -> str:
    """One of ``allowed``; the error lists them as the key's message always has."""
    value = section.get(key, default)
    if value not in allowed:
        if len(allowed) == 2:
            known = f"'{allowed[0]}' or '{allowed[1]}'"
        else:
            known = f"{', '.join(allowed[:-1])} or {allowed[-1]}"
        raise ConfigError(f"{prefix}{key}", f"must be {known}, got {value!r}")
    return str(value)


def _hostname(raw: Mapping[str, Any]) -> str:
    hostname = raw.get("hostname", socket.gethostname())
    if not isinstance(hostname, str) or not hostname or any(c.isspace() for c in hostname):
        raise ConfigError("hostname", f"must be a host name without spaces, got {hostname!r}")
    return hostname


def _listeners(raw: Mapping[str, Any]) -> tuple[Listener, ...]:
    listen_raw = raw.get("listen", "127.0.0.1:2525")
    items = listen_raw if isinstance(listen_raw, list) else [listen_raw]
    if not items:
        raise ConfigError("listen", "needs at least one address")
    return tuple(
        _listener(f"listen[{i}]" if isinstance(listen_raw, list) else "listen", v)
        for i, v in enumerate(items)
    )


def _upstream_tls(raw: Mapping[str, Any]) -> dict[str, Any]:
    """``upstream_tls``: the Config fields it sets."""
    up_tls = _section(raw, "upstream_tls", {"mode", "ca_file", "server_name", "ciphers", "groups"})
    mode = _choice(up_tls, "mode", "none", ("none", "opportunistic", "required"), "upstream_tls.")
    ca_file = up_tls.get("ca_file")
    if ca_file is not None and (
        not isinstance(ca_file, str) or not pathlib.Path(ca_file).is_file()
    ):
        raise ConfigError("upstream_tls.ca_file", f"no such file: {ca_file!r}")
    server_name = up_tls.get("server_name")
    if server_name is not None and not isinstance(server_name, str):
        raise ConfigError("upstream_tls.server_name", "must be a host name")
    ciphers = _ciphers("upstream_tls.ciphers", up_tls.get("ciphers"))
    groups = _groups("upstream_tls.groups", up_tls.get("groups"))
    try:
        tlsctx.client_context(verify=False, ciphers=ciphers, groups=groups)
    except tlsctx.TLSSetupError as exc:
        raise ConfigError(exc.key, exc.problem) from None
    return {
        "upstream_tls": mode,
        "upstream_tls_ca_file": ca_file,
        "upstream_tls_server_name": server_name,
        "upstream_tls_ciphers": ciphers,
        "upstream_tls_groups": groups,
    }


def _banner(raw: Mapping[str, Any]) -> str | None:
    banner = raw.get("banner")
    if banner is not None and (
        not isinstance(banner, str)
        or not banner.strip()
        or any(c in banner for c in "\r\n")
        or len(banner.encode()) > 500
    ):
        raise ConfigError(
            "banner", "must be one line of text, at most 500 octets (the 220 greeting's text)"
        )
    return banner


def _upstream_limits(raw: Mapping[str, Any]) -> tuple[int, float]:
    """``upstream_limits``: (max_sessions, queue_seconds)."""
    up_limits = _section(raw, "upstream_limits", {"max_sessions", "queue_seconds"})
    max_sessions = int(
        _number("upstream_limits.max_sessions", up_limits.get("max_sessions", 0), 0, True)
    )
    queue_seconds = _number("upstream_limits.queue_seconds", up_limits.get("queue_seconds", 30), 0)
    return max_sessions, queue_seconds


def _sink_directory(raw: Mapping[str, Any]) -> str:
    sink = _section(raw, "sink", {"directory"})
    sink_dir = sink.get("directory", "smtpguard-mail")
    if not isinstance(sink_dir, str) or not sink_dir:
        raise ConfigError("sink.directory", f"must be a folder path, got {sink_dir!r}")
    return sink_dir


def _metrics_listen(raw: Mapping[str, Any]) -> Address | None:
    metrics = _section(raw, "metrics", {"listen", "enabled"})
    listen = parse_address("metrics.listen", metrics.get("listen", "127.0.0.1:9325"))
    if not _bool("metrics.enabled", metrics.get("enabled", True)):
        return None
    return listen


def _help_topics(help_: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    topics_raw = help_.get("topics", DEFAULT_HELP_TOPICS)
    if not isinstance(topics_raw, Mapping):
        raise ConfigError("help.topics", "must be a mapping of VERB: text")
    return {
        str(k).upper(): _lines(f"help.topics.{k}", v)
        for k, v in topics_raw.items()  # noqa: PERF102
    }


def _discard_keywords(ehlo: Mapping[str, Any]) -> list[str]:
    discard = ehlo.get("discard_keywords", [])
    if not isinstance(discard, list) or not all(isinstance(k, str) and k for k in discard):
        raise ConfigError("ehlo.discard_keywords", "must be a list of EHLO keywords")
    return discard


def _connection_limits(limits: Mapping[str, Any]) -> tuple[int, int]:
    """``limits.max_connections`` and ``limits.max_connections_per_client``."""
    max_connections = int(
        _number("limits.max_connections", limits.get("max_connections", 10000), 1, True)
    )
    max_per_client = int(
        _number(
            "limits.max_connections_per_client",
            limits.get("max_connections_per_client", 50),
            1,
            True,
        )
    )
    return max_connections, max_per_client


def _line_limits(limits: Mapping[str, Any]) -> tuple[int, int]:
    """``limits.max_line_bytes`` and ``limits.max_pipelined_commands``."""
    max_line_bytes = int(
        _number("limits.max_line_bytes", limits.get("max_line_bytes", 512), 64, True)
    )
    max_pipelined = int(
        _number("limits.max_pipelined_commands", limits.get("max_pipelined_commands", 100), 1, True)
    )
    return max_line_bytes, max_pipelined


def _log(raw: Mapping[str, Any]) -> tuple[str, str]:
    """``log``: (level, format)."""
    log = _section(raw, "log", {"level", "format"})
    log_level = str(log.get("level", "info")).lower()
    if log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError("log.level", f"must be debug, info, warning or error, got {log_level!r}")
    return log_level, _choice(log, "format", "logfmt", ("logfmt", "json"), "log.")


def _annotate(raw: Mapping[str, Any]) -> tuple[str, str]:
    """``annotate``: (mode, header)."""
    annotate = _section(raw, "annotate", {"mode", "header"})
    mode = annotate.get("mode", "off")
    if mode is False:
        mode = "off"
    if mode is True:
        mode = "always"
    if mode not in ("off", "always", "violations"):
        raise ConfigError("annotate.mode", f"must be off, always or violations, got {mode!r}")
    header = annotate.get("header", "X-SMTPGuard")
    if (
        not isinstance(header, str)
        or not 0 < len(header) <= 76
        or not all(c.isascii() and (c.isalnum() or c == "-") for c in header)
    ):
        raise ConfigError("annotate.header", f"must be a header field name, got {header!r}")
    return mode, header


def load_file(path: str | pathlib.Path) -> Config:
    """Read and validate a YAML file; errors name the key (or ``file``) and the problem."""
    path = pathlib.Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("file", f"cannot read {path}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError("file", f"{path} is not valid YAML{where}") from None
    return load(raw)


def listener_specs(config: Config) -> tuple[Listener, ...]:
    """The configured listeners (``listen`` as mappings or plain addresses)."""
    return config.listeners or tuple(Listener(a) for a in config.listen)
