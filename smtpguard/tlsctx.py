"""TLS contexts: Mozilla's "intermediate" profile by default, key-exchange
groups by configuration, and session-ticket keys shared by all workers.

Python's ``ssl`` (3.11-3.14) cannot set the key-exchange groups (only one
ECDH curve, for TLS 1.2) nor the session-ticket keys, and OpenSSL's own
defaults offer X448 and P-521 (which Mozilla's intermediate profile does not
list) and random ticket keys per context (so a client that reconnects to
another worker cannot resume).  Both are one ``SSL_CTX_ctrl`` call in
OpenSSL; :func:`_ssl_ctx` finds the ``SSL_CTX`` behind an ``SSLContext`` and
checks that it did (it asks OpenSSL for the context's options and compares
them with Python's view) before calling anything with it.  Where that check
fails, :class:`TLSSetupError` says so and the configuration is refused.
"""

from __future__ import annotations

import ctypes
import os
import ssl
from collections.abc import Sequence

#: Mozilla's intermediate TLS 1.2 suites (server-side order), without the
#: DHE ones (no DH parameters are configured).  TLS 1.3 suites are OpenSSL's
#: defaults, all of which the profile lists.
INTERMEDIATE_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)
#: Mozilla intermediate's groups (OpenSSL names).
DEFAULT_GROUPS: tuple[str, ...] = ("X25519", "P-256", "P-384")

#: Where the supervisor passes the session-ticket keys to its workers (hex).
TICKET_KEYS_ENV = "SMTPGUARD_TLS_TICKET_KEYS"
#: OpenSSL's ticket keys: 16 bytes name, 32 HMAC, 32 AES.
TICKET_KEYS_BYTES = 80

_SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59
_SSL_CTRL_SET_GROUPS_LIST = 92


class TLSSetupError(ValueError):
    """A TLS setting OpenSSL refused; ``key`` names the setting."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


def _libssl() -> ctypes.CDLL:
    import _ssl

    lib = ctypes.CDLL(_ssl.__file__)  # its symbol look-ups reach the libssl it uses
    lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    lib.SSL_CTX_ctrl.restype = ctypes.c_long
    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    return lib


_LIB: ctypes.CDLL | None = None


def _ssl_ctx(context: ssl.SSLContext) -> tuple[ctypes.CDLL, int]:
    """libssl and the ``SSL_CTX *`` of ``context`` (the first field after the
    object header in CPython's ``PySSLContext``), checked."""
    global _LIB
    if _LIB is None:
        _LIB = _libssl()
    lib = _LIB
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not pointer or int(lib.SSL_CTX_get_options(pointer)) != int(context.options):
        raise TLSSetupError("tls", "cannot reach OpenSSL's context from this Python build")
    return lib, pointer


def set_groups(context: ssl.SSLContext, groups: Sequence[str], key: str = "tls.groups") -> None:
    """The key-exchange groups, in order of preference (OpenSSL names:
    ``X25519``, ``P-256``, ``P-384``, ``X448``, ``P-521``, ``ffdhe2048`` ...)."""
    joined = ":".join(groups)
    if not joined.isascii() or not joined.isprintable():
        raise TLSSetupError(key, f"unknown or unsupported group in {joined!r}")
    lib, pointer = _ssl_ctx(context)
    names = joined.encode("ascii")
    if lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_GROUPS_LIST, 0, names) != 1:
        raise TLSSetupError(key, f"unknown or unsupported group in {':'.join(groups)!r}")


def set_ticket_keys(context: ssl.SSLContext, keys: bytes) -> None:
    """Session-ticket keys: the same in every worker, so a ticket issued by
    one is accepted by the others (resumption whichever worker accepts)."""
    if len(keys) != TICKET_KEYS_BYTES:
        raise ValueError(f"ticket keys must be {TICKET_KEYS_BYTES} bytes")
    lib, pointer = _ssl_ctx(context)
    buffer = ctypes.create_string_buffer(keys, len(keys))
    if lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_TLSEXT_TICKET_KEYS, len(keys), buffer) != 1:
        raise TLSSetupError("tls", "OpenSSL refused the session-ticket keys")


_PROCESS_TICKET_KEYS: bytes | None = None


def ticket_keys() -> bytes:
    """This process's ticket keys: the supervisor's (inherited through
    :data:`TICKET_KEYS_ENV`), else made once per process (kept across reloads)."""
    global _PROCESS_TICKET_KEYS
    if _PROCESS_TICKET_KEYS is None:
        shared = os.environ.get(TICKET_KEYS_ENV, "")
        try:
            keys = bytes.fromhex(shared)
        except ValueError:
            keys = b""
        if len(keys) != TICKET_KEYS_BYTES:
            keys = os.urandom(TICKET_KEYS_BYTES)
        _PROCESS_TICKET_KEYS = keys
    return _PROCESS_TICKET_KEYS


def set_ciphers(context: ssl.SSLContext, ciphers: str, key: str) -> None:
    try:
        context.set_ciphers(ciphers)
    except ssl.SSLError:
        raise TLSSetupError(key, f"no cipher matches the OpenSSL string {ciphers!r}") from None


def server_context(
    certificate: str,
    key_file: str,
    *,
    min_version: str = "TLSv1.2",
    ciphers: str | None = None,
    groups: Sequence[str] = DEFAULT_GROUPS,
) -> ssl.SSLContext:
    """The context for TLS towards clients (STARTTLS and implicit TLS)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if min_version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
    )
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_COMPRESSION
    set_ciphers(ctx, ciphers or INTERMEDIATE_CIPHERS, "tls.ciphers")
    set_groups(ctx, groups, "tls.groups")
    ctx.load_cert_chain(certificate, key_file)
    set_ticket_keys(ctx, ticket_keys())
    return ctx


def client_context(
    *,
    verify: bool,
    ca_file: str | None = None,
    ciphers: str | None = None,
    groups: Sequence[str] = DEFAULT_GROUPS,
) -> ssl.SSLContext:
    """The context for TLS towards the upstream (``upstream_tls``)."""
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    set_ciphers(ctx, ciphers or INTERMEDIATE_CIPHERS, "upstream_tls.ciphers")
    set_groups(ctx, groups, "upstream_tls.groups")
    return ctx
