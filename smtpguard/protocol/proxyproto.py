"""Client identity across a proxy: HAProxy PROXY protocol headers and Postfix XCLIENT.

Theory of operation
===================

smtpguard sits between the CLIENT and the UPSTREAM, so each side sees
smtpguard's address instead of the real one. Two standard ways carry the
real endpoints across, and this module speaks both, without doing any I/O:

Receiving a PROXY header (a load balancer in front of smtpguard)
    The HAProxy PROXY protocol (proxy-protocol.txt, versions 1 and 2) puts one
    header before the first SMTP byte. :func:`parse_proxy_header` is
    incremental in the sans-I/O way: the caller keeps a buffer of what the
    CLIENT side sent so far and calls it after every read. It returns
    ``None`` while the buffer is a strict prefix of a header that could still
    be valid, ``(ProxyInfo, consumed)`` once the header is complete (the
    bytes after ``consumed`` are SMTP and belong to the session, untouched),
    and raises :class:`ProxyHeaderError` as soon as the bytes cannot become a
    valid header. It never needs more than :data:`MAX_HEADER_BYTES` bytes to
    decide, so a caller that buffers at most that much cannot be made to
    hold more.

    Version 1 is one text line of at most 107 bytes::

        PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\\r\\n
        PROXY TCP6 2001:db8::1 2001:db8::2 56324 25\\r\\n
        PROXY UNKNOWN\\r\\n      (anything up to the CRLF is ignored)

    Version 2 is binary: the 12-byte :data:`V2_SIGNATURE`, a version/command
    byte (``0x21`` PROXY, ``0x20`` LOCAL), a family/transport byte (``0x11``
    TCP over IPv4, ``0x21`` TCP over IPv6, ``0x00`` unspecified), a 16-bit
    big-endian length, the addresses and ports, then TLVs.

    Decisions where the specification leaves room:

    * Parsing is strict where a sloppy parser would let a sender smuggle
      something: exactly one space between v1 fields, CRLF only, decimal
      ports without sign or leading zeros in ``0..65535``, addresses checked
      with :mod:`ipaddress` against the announced family (a ``TCP4`` line
      with an IPv6 address is an error), no IPv6 zone ids.
    * Hosts are returned in :mod:`ipaddress`'s canonical text
      (``2001:DB8:0::1`` becomes ``2001:db8::1``). An IPv4-mapped IPv6
      address is kept as the IPv6 address it was sent as, written
      ``::ffff:192.0.2.1`` (RFC 5952 section 5): the header said TCP6, and
      ``ipaddress.IPv6Address(host).ipv4_mapped`` gives the IPv4 form to a
      caller who wants it.
    * ``UNKNOWN`` (v1), LOCAL (v2) and PROXY with the unspecified family (v2)
      all give a :class:`ProxyInfo` whose hosts and ports are ``None``: the
      caller keeps the real connection endpoints, as the specification says.
      For LOCAL the whole address block is discarded unread, as specified.
    * TCP is the only transport smtpguard relays, so v2 UDP and UNIX-socket
      families are rejected as unsupported, and any family byte outside the
      specification is rejected as malformed.
    * v2 TLVs are skipped, but their framing must add up exactly to the
      announced length, and a ``PP2_TYPE_CRC32C`` TLV, when present, is
      checked: a header that fails its own checksum is dropped.
    * A v2 header announcing more than :data:`MAX_V2_PAYLOAD_BYTES` bytes is
      refused before they are read.

Sending a PROXY header (an UPSTREAM that accepts one, such as Postfix with
``smtpd_upstream_proxy_protocol = haproxy``)
    :func:`build_proxy_v1` and :func:`build_proxy_v2` write a header for the
    CLIENT's real endpoints. ``TCP4`` or ``TCP6`` follows the addresses'
    family; when the two families differ (an IPv6 listener relaying to an
    IPv4 address, say) the IPv4 one is written as an IPv4-mapped IPv6
    address and the header says ``TCP6``, which is what HAProxy itself does.
    When any endpoint is unknown (``None``) the header says so honestly:
    ``PROXY UNKNOWN`` for v1, a LOCAL command with the unspecified family for
    v2 (HAProxy's choice too), and the UPSTREAM falls back to the real
    connection endpoints. Zone ids are dropped: the header cannot carry them.

Sending XCLIENT (a Postfix UPSTREAM with ``smtpd_authorized_xclient_hosts``)
    :func:`build_xclient` writes the ``XCLIENT`` command lines of Postfix's
    XCLIENT_README. Values are xtext-encoded (RFC 1891, :func:`xtext_encode`),
    so no CR, LF or space in a CLIENT-supplied HELO name can change the
    command. Every line is at most 512 bytes with its CRLF. When the
    attributes do not fit in one line they are spread over several, with
    NAME, ADDR and PORT together in the *last* line: once ADDR is sent,
    Postfix re-checks XCLIENT authorization against the new identity and
    usually refuses any further XCLIENT. Each line is answered by the
    UPSTREAM with a fresh ``220`` greeting, after which the SMTP session
    starts over (EHLO again); the caller sends one line, waits for its
    ``220``, then sends the next.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass
from typing import Final, TypeAlias

_IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

# ---------------------------------------------------------------------------
# PROXY protocol: constants
# ---------------------------------------------------------------------------

#: The twelve bytes that start every version 2 header.
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
#: The text that starts every version 1 header.
V1_PREFIX: Final = b"PROXY "
#: The longest version 1 header, CRLF included (proxy-protocol.txt 2.1).
MAX_V1_HEADER_BYTES: Final = 107
#: The v2 fixed part: signature, version/command, family, length.
V2_FIXED_BYTES: Final = 16
#: The largest v2 address-and-TLV block accepted. The specification sets no
#: bound beyond the 16-bit length; real senders stay far below this.
MAX_V2_PAYLOAD_BYTES: Final = 2048
#: Enough bytes to decide on any header: a caller never needs to buffer more.
MAX_HEADER_BYTES: Final = V2_FIXED_BYTES + MAX_V2_PAYLOAD_BYTES

_V2_VERSION: Final = 0x2
_V2_CMD_LOCAL: Final = 0x0
_V2_CMD_PROXY: Final = 0x1

_FAM_UNSPEC: Final = 0x00
_FAM_TCP4: Final = 0x11
_FAM_TCP6: Final = 0x21
#: Families the specification defines but smtpguard cannot use (UDP, UNIX).
_FAM_UNSUPPORTED: Final = frozenset({0x12, 0x22, 0x31, 0x32})

#: Address block lengths: source, destination, source port, destination port.
_V2_ADDR_BYTES: Final = {_FAM_UNSPEC: 0, _FAM_TCP4: 12, _FAM_TCP6: 36}

_PP2_TYPE_CRC32C: Final = 0x03
_TLV_HEADER_BYTES: Final = 3

_PORT_RE: Final = re.compile(r"0|[1-9][0-9]{0,4}")


class ProxyHeaderError(Exception):
    """The bytes are not a valid PROXY protocol header; drop the connection."""


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    """The endpoints a PROXY header announced.

    Hosts and ports are all ``None`` when the header carries no usable
    address (v1 ``UNKNOWN``, v2 LOCAL, v2 unspecified family): use the real
    connection endpoints then.
    """

    source_host: str | None  #: the CLIENT's address, canonical text
    source_port: int | None
    dest_host: str | None  #: the address the CLIENT connected to
    dest_port: int | None
    version: int  #: 1 or 2

    @property
    def is_unknown(self) -> bool:
        """True when the header gave no address (use the real endpoints)."""
        return self.source_host is None


# ---------------------------------------------------------------------------
# PROXY protocol: parsing
# ---------------------------------------------------------------------------


def parse_proxy_header(data: bytes | bytearray) -> tuple[ProxyInfo, int] | None:
    """Parse a PROXY header (v1 or v2) at the start of ``data``.

    Returns ``(info, consumed)`` once a complete header is there, where
    ``data[consumed:]`` is what followed it (SMTP bytes, untouched); ``None``
    while ``data`` is a prefix of a header that could still be valid (call
    again with more bytes); raises :class:`ProxyHeaderError` as soon as it
    cannot be. Never looks at more than :data:`MAX_HEADER_BYTES` bytes.
    """
    view = bytes(data[:MAX_HEADER_BYTES])
    if not view:
        return None
    if view[0] == V1_PREFIX[0]:
        if not _is_prefix_compatible(view, V1_PREFIX):
            raise ProxyHeaderError("not a PROXY protocol header")
        return _parse_v1(view)
    if view[0] == V2_SIGNATURE[0]:
        if not _is_prefix_compatible(view, V2_SIGNATURE):
            raise ProxyHeaderError("bad PROXY protocol v2 signature")
        return _parse_v2(view)
    raise ProxyHeaderError("not a PROXY protocol header")


def _is_prefix_compatible(data: bytes, prefix: bytes) -> bool:
    """True if ``data`` starts with ``prefix`` or is itself a prefix of it."""
    n = min(len(data), len(prefix))
    return data[:n] == prefix[:n]


def _parse_v1(data: bytes) -> tuple[ProxyInfo, int] | None:
    window = data[:MAX_V1_HEADER_BYTES]
    lf = window.find(b"\n")
    if lf < 0:
        # The CRLF must end by byte 107: a 106th byte that is not CR is too late.
        if len(window) >= MAX_V1_HEADER_BYTES - 1 and window[MAX_V1_HEADER_BYTES - 2] != 0x0D:
            raise ProxyHeaderError("PROXY v1 line longer than 107 bytes")
        if b"\r" in window[:-1]:
            raise ProxyHeaderError("PROXY v1 line has a bare CR")
        return None
    if lf == 0 or window[lf - 1] != 0x0D or b"\r" in window[: lf - 1]:
        raise ProxyHeaderError("PROXY v1 line must end with CRLF only")
    consumed = lf + 1
    fields = window[: lf - 1].split(b" ")
    proto = fields[1] if len(fields) > 1 else b""
    if proto == b"UNKNOWN":
        # The specification: ignore anything presented before the CRLF.
        return ProxyInfo(None, None, None, None, version=1), consumed
    if proto not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("PROXY v1 protocol must be TCP4, TCP6 or UNKNOWN")
    if len(fields) != 6:
        raise ProxyHeaderError("PROXY v1 line needs exactly five fields after PROXY")
    try:
        texts = [field.decode("ascii") for field in fields]
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 line is not ASCII") from None
    want: type[_IPAddress] = ipaddress.IPv4Address if proto == b"TCP4" else ipaddress.IPv6Address
    src = _parse_v1_address(texts[2], want)
    dst = _parse_v1_address(texts[3], want)
    src_port = _parse_v1_port(texts[4])
    dst_port = _parse_v1_port(texts[5])
    return ProxyInfo(_text(src), src_port, _text(dst), dst_port, version=1), consumed


def _text(address: _IPAddress) -> str:
    """Canonical text; IPv4-mapped IPv6 in the RFC 5952 section 5 form ``::ffff:a.b.c.d``.

    (``str()`` gives ``::ffff:c000:201`` before Python 3.13 and the dotted
    form after; this pins the dotted one.)
    """
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return f"::ffff:{address.ipv4_mapped}"
    return str(address)


def _parse_v1_address(text: str, want: type[_IPAddress]) -> _IPAddress:
    if "%" in text:
        raise ProxyHeaderError("PROXY v1 address must not carry a zone id")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyHeaderError("PROXY v1 address is not an IP address") from None
    if not isinstance(address, want):
        raise ProxyHeaderError("PROXY v1 address does not match the announced family")
    return address


def _parse_v1_port(text: str) -> int:
    if not _PORT_RE.fullmatch(text):
        raise ProxyHeaderError("PROXY v1 port is not a decimal number")
    port = int(text)
    if port > 0xFFFF:
        raise ProxyHeaderError("PROXY v1 port out of range")
    return port


def _parse_v2(data: bytes) -> tuple[ProxyInfo, int] | None:
    # Check each fixed byte as soon as it arrives, so garbage fails early.
    if len(data) <= len(V2_SIGNATURE):
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != _V2_VERSION:
        raise ProxyHeaderError("PROXY v2 header with an unknown version")
    if command not in (_V2_CMD_LOCAL, _V2_CMD_PROXY):
        raise ProxyHeaderError("PROXY v2 header with an unknown command")
    family = data[13] if len(data) > 13 else None
    if command == _V2_CMD_PROXY and family is not None:
        if family in _FAM_UNSUPPORTED:
            raise ProxyHeaderError("PROXY v2 family not supported (TCP only)")
        if family not in _V2_ADDR_BYTES:
            raise ProxyHeaderError("PROXY v2 header with an unknown family")
    if len(data) < V2_FIXED_BYTES:
        return None
    (length,) = struct.unpack_from("!H", data, 14)
    if length > MAX_V2_PAYLOAD_BYTES:
        raise ProxyHeaderError("PROXY v2 header too long")
    consumed = V2_FIXED_BYTES + length
    if len(data) < consumed:
        return None
    unknown = ProxyInfo(None, None, None, None, version=2)
    if command == _V2_CMD_LOCAL:
        # The specification: use the real endpoints, discard the block unread.
        return unknown, consumed
    assert family is not None
    header = data[:consumed]
    addr_bytes = _V2_ADDR_BYTES[family]
    if length < addr_bytes:
        raise ProxyHeaderError("PROXY v2 address block shorter than its family needs")
    _check_tlvs(header, V2_FIXED_BYTES + addr_bytes)
    if family == _FAM_UNSPEC:
        return unknown, consumed
    ip_bytes = (addr_bytes - 4) // 2
    src_raw = header[16 : 16 + ip_bytes]
    dst_raw = header[16 + ip_bytes : 16 + 2 * ip_bytes]
    src_port, dst_port = struct.unpack_from("!HH", header, 16 + 2 * ip_bytes)
    src = ipaddress.ip_address(src_raw)
    dst = ipaddress.ip_address(dst_raw)
    return ProxyInfo(_text(src), src_port, _text(dst), dst_port, version=2), consumed


def _check_tlvs(header: bytes, start: int) -> None:
    """Walk the TLVs after the addresses: framing must be exact, CRC32C must match."""
    pos = start
    end = len(header)
    while pos < end:
        if pos + _TLV_HEADER_BYTES > end:
            raise ProxyHeaderError("PROXY v2 TLV truncated")
        tlv_type = header[pos]
        (tlv_len,) = struct.unpack_from("!H", header, pos + 1)
        value_at = pos + _TLV_HEADER_BYTES
        if value_at + tlv_len > end:
            raise ProxyHeaderError("PROXY v2 TLV runs past the header")
        if tlv_type == _PP2_TYPE_CRC32C:
            if tlv_len != 4:
                raise ProxyHeaderError("PROXY v2 CRC32C TLV must be 4 bytes")
            (expected,) = struct.unpack_from("!I", header, value_at)
            zeroed = header[:value_at] + b"\x00\x00\x00\x00" + header[value_at + 4 :]
            if _crc32c(zeroed) != expected:
                raise ProxyHeaderError("PROXY v2 CRC32C mismatch")
        pos = value_at + tlv_len


def _make_crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE: Final = _make_crc32c_table()


def _crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as PP2_TYPE_CRC32C uses; zlib only has CRC-32."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# ---------------------------------------------------------------------------
# PROXY protocol: building
# ---------------------------------------------------------------------------


def build_proxy_v1(
    src_host: str | None, src_port: int | None, dst_host: str | None, dst_port: int | None
) -> bytes:
    """A PROXY v1 line for these endpoints (``PROXY UNKNOWN`` if any is ``None``).

    Raises :class:`ValueError` for a host that is not an IP address or a port
    outside ``0..65535``.
    """
    endpoints = _endpoints(src_host, src_port, dst_host, dst_port)
    if endpoints is None:
        return b"PROXY UNKNOWN\r\n"
    src, sport, dst, dport = endpoints
    proto = "TCP4" if isinstance(src, ipaddress.IPv4Address) else "TCP6"
    return f"PROXY {proto} {_text(src)} {_text(dst)} {sport} {dport}\r\n".encode("ascii")


def build_proxy_v2(
    src_host: str | None, src_port: int | None, dst_host: str | None, dst_port: int | None
) -> bytes:
    """A PROXY v2 header (no TLVs) for these endpoints (LOCAL if any is ``None``).

    Raises :class:`ValueError` for a host that is not an IP address or a port
    outside ``0..65535``.
    """
    endpoints = _endpoints(src_host, src_port, dst_host, dst_port)
    if endpoints is None:
        return V2_SIGNATURE + bytes([_V2_VERSION << 4 | _V2_CMD_LOCAL, _FAM_UNSPEC, 0, 0])
    src, sport, dst, dport = endpoints
    family = _FAM_TCP4 if isinstance(src, ipaddress.IPv4Address) else _FAM_TCP6
    block = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    fixed = bytes([_V2_VERSION << 4 | _V2_CMD_PROXY, family]) + struct.pack("!H", len(block))
    return V2_SIGNATURE + fixed + block


def _endpoints(
    src_host: str | None, src_port: int | None, dst_host: str | None, dst_port: int | None
) -> tuple[_IPAddress, int, _IPAddress, int] | None:
    """Validated endpoints of one family, or None if any is unknown."""
    if src_host is None or dst_host is None or src_port is None or dst_port is None:
        return None
    src = _address_for_sending(src_host)
    dst = _address_for_sending(dst_host)
    if src.version != dst.version:
        # Mixed families: say TCP6 and write the IPv4 side IPv4-mapped.
        src = _as_ipv6(src)
        dst = _as_ipv6(dst)
    return src, _check_port(src_port), dst, _check_port(dst_port)


def _address_for_sending(host: str) -> _IPAddress:
    """Parse an address we are about to send; zone ids cannot travel, so drop them."""
    address = ipaddress.ip_address(host)
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        address = ipaddress.IPv6Address(address.packed)
    return address


def _as_ipv6(address: _IPAddress) -> ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv6Address):
        return address
    return ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + address.packed)


def _check_port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ValueError(f"port must be an integer in 0..65535, got {port!r}")
    return port


# ---------------------------------------------------------------------------
# Postfix XCLIENT
# ---------------------------------------------------------------------------

#: The longest XCLIENT command line, CRLF included (RFC 5321 4.5.3.1.4).
XCLIENT_MAX_LINE_BYTES: Final = 512
#: The longest attribute value sent, xtext-encoded. Postfix refuses NAME and
#: HELO values over 255 characters; the xtext form is never shorter.
XCLIENT_MAX_VALUE_CHARS: Final = 255
#: XCLIENT's value for "not available" (also used for anything unsendable).
XCLIENT_UNAVAILABLE: Final = "[UNAVAILABLE]"
#: XCLIENT's value for "temporarily not available" (a DNS lookup that failed).
XCLIENT_TEMPUNAVAIL: Final = "[TEMPUNAVAIL]"

_XCLIENT_VERB: Final = "XCLIENT"
_XCLIENT_SPECIAL: Final = frozenset({XCLIENT_UNAVAILABLE, XCLIENT_TEMPUNAVAIL})
_XCLIENT_PROTOS: Final = frozenset({"SMTP", "ESMTP"})


def xtext_encode(s: str) -> str:
    """Encode ``s`` as RFC 1891 xtext.

    Bytes ``!``..``~`` other than ``+`` and ``=`` stand for themselves; every
    other byte is ``+XX`` with two upper-case hex digits. Text is taken as
    UTF-8; lone surrogates from a ``surrogateescape`` decode become the bytes
    they stood for (any other lone surrogate is written as UTF-8 would write
    it if allowed, so this never raises).
    """
    try:
        raw = s.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = s.encode("utf-8", "surrogatepass")
    out: list[str] = []
    for byte in raw:
        if 0x21 <= byte <= 0x7E and byte not in (0x2B, 0x3D):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


def build_xclient(
    addr: str,
    port: int | None = None,
    name: str | None = None,
    helo: str | None = None,
    proto: str | None = None,
    login: str | None = None,
) -> list[bytes]:
    """The XCLIENT command lines that give the UPSTREAM this CLIENT identity.

    ``addr`` is the CLIENT's IP address (IPv6 is sent as ``IPV6:addr``; an
    IPv4-mapped IPv6 address is sent as plain IPv4, as Postfix writes such
    clients itself), or ``[UNAVAILABLE]``/``[TEMPUNAVAIL]``. NAME and PORT are
    always sent, as ``[UNAVAILABLE]`` when ``None``, so the UPSTREAM never
    keeps smtpguard's own name and port for the CLIENT. HELO, PROTO and LOGIN
    are sent only when given. An empty NAME, HELO or LOGIN, or one longer
    than :data:`XCLIENT_MAX_VALUE_CHARS` once xtext-encoded, is sent as
    ``[UNAVAILABLE]`` (these come from the CLIENT or DNS and must not make
    this raise).

    Every line is at most :data:`XCLIENT_MAX_LINE_BYTES` bytes with its CRLF;
    NAME, ADDR and PORT travel together in the last line (see the module
    docstring for why, and for how to send them).

    Raises :class:`ValueError` for an ``addr`` that is not an IP address, a
    port outside ``0..65535``, or a ``proto`` other than SMTP or ESMTP; these
    come from smtpguard itself, so a bad one is a bug.
    """
    leading: list[str] = []
    if helo is not None:
        leading.append("HELO=" + _xclient_value(helo))
    if proto is not None:
        leading.append("PROTO=" + _xclient_proto(proto))
    if login is not None:
        leading.append("LOGIN=" + _xclient_value(login))
    port_text = XCLIENT_UNAVAILABLE if port is None else str(_check_port(port))
    identity = " ".join(
        [
            "NAME=" + _xclient_value(name),
            "ADDR=" + _xclient_addr(addr),
            "PORT=" + port_text,
        ]
    )
    # Each piece fits a line on its own (values are bounded), and greedy
    # packing keeps the identity piece, which comes last, in the last line.
    budget = XCLIENT_MAX_LINE_BYTES - len("\r\n")
    lines: list[str] = []
    current = _XCLIENT_VERB
    for piece in [*leading, identity]:
        if current != _XCLIENT_VERB and len(current) + 1 + len(piece) > budget:
            lines.append(current)
            current = _XCLIENT_VERB
        current += " " + piece
    lines.append(current)
    return [(line + "\r\n").encode("ascii") for line in lines]


def _xclient_value(value: str | None) -> str:
    if value is None or value == "":
        return XCLIENT_UNAVAILABLE
    if value in _XCLIENT_SPECIAL:
        return value
    encoded = xtext_encode(value)
    if len(encoded) > XCLIENT_MAX_VALUE_CHARS:
        return XCLIENT_UNAVAILABLE
    return encoded


def _xclient_addr(addr: str) -> str:
    if addr in _XCLIENT_SPECIAL:
        return addr
    address = _address_for_sending(addr)
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return "IPV6:" + str(address)
    return str(address)


def _xclient_proto(proto: str) -> str:
    if proto in _XCLIENT_SPECIAL:
        return proto
    if proto.upper() not in _XCLIENT_PROTOS:
        raise ValueError(f"XCLIENT PROTO must be SMTP or ESMTP, got {proto!r}")
    return proto.upper()
