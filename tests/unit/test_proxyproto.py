"""PROXY protocol headers (v1 and v2) and Postfix XCLIENT lines, without sockets."""

from __future__ import annotations

import contextlib
import ipaddress
import re
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpguard.protocol.proxyproto import (
    MAX_HEADER_BYTES,
    MAX_V2_PAYLOAD_BYTES,
    V2_SIGNATURE,
    XCLIENT_MAX_LINE_BYTES,
    ProxyHeaderError,
    ProxyInfo,
    build_proxy_v1,
    build_proxy_v2,
    build_xclient,
    parse_proxy_header,
    xtext_encode,
)

SMTP_AFTER = b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\n"
MAX6 = ":".join(["ffff"] * 8)

# ---------------------------------------------------------------------------
# An independent v2 writer and CRC-32C, so the parser is not tested against itself
# ---------------------------------------------------------------------------


def crc32c_bitwise(data: bytes) -> int:
    """CRC-32C one bit at a time (slow, obviously right)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 * (crc & 1))
    return crc ^ 0xFFFFFFFF


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def v2(ver_cmd: int, fam: int, block: bytes, length: int | None = None) -> bytes:
    size = len(block) if length is None else length
    return V2_SIGNATURE + bytes([ver_cmd, fam]) + struct.pack("!H", size) + block


def v2_with_crc(ver_cmd: int, fam: int, block: bytes, corrupt: bool = False) -> bytes:
    """A v2 header ending in a CRC32C TLV computed over the whole header."""
    zeroed = v2(ver_cmd, fam, block + tlv(0x03, b"\x00" * 4))
    crc = crc32c_bitwise(zeroed) ^ (1 if corrupt else 0)
    return zeroed[:-4] + struct.pack("!I", crc)


def tcp4_block(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.IPv4Address(src).packed
        + ipaddress.IPv4Address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


def tcp6_block(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


SOME_TLVS = (
    tlv(0x01, b"smtp")  # PP2_TYPE_ALPN
    + tlv(0x02, b"mx.example.org")  # PP2_TYPE_AUTHORITY
    + tlv(0x04, b"\x00" * 7)  # PP2_TYPE_NOOP
    + tlv(0x20, b"\x01" + b"\x00" * 4 + tlv(0x21, b"TLSv1.3"))  # PP2_TYPE_SSL
    + tlv(0xE0, b"")  # a custom type, empty
)

UNKNOWN_V1 = ProxyInfo(None, None, None, None, version=1)
UNKNOWN_V2 = ProxyInfo(None, None, None, None, version=2)

# (header, expected info) for every well-formed example below.
VALID = [
    # The examples of proxy-protocol.txt 2.1.
    (
        b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
        ProxyInfo("255.255.255.255", 65535, "255.255.255.255", 65535, 1),
    ),
    (
        f"PROXY TCP6 {MAX6} {MAX6} 65535 65535\r\n".encode(),
        ProxyInfo(MAX6, 65535, MAX6, 65535, 1),
    ),
    (b"PROXY UNKNOWN\r\n", UNKNOWN_V1),
    (f"PROXY UNKNOWN {MAX6} {MAX6} 65535 65535\r\n".encode(), UNKNOWN_V1),
    (
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        ProxyInfo("192.168.0.1", 56324, "192.168.0.11", 443, 1),
    ),
    (
        b"PROXY TCP6 2001:DB8:0:0::1 2001:db8::2 0 25\r\n",
        ProxyInfo("2001:db8::1", 0, "2001:db8::2", 25, 1),
    ),
    (
        b"PROXY TCP6 ::ffff:192.0.2.1 ::ffff:c000:202 1025 25\r\n",
        ProxyInfo("::ffff:192.0.2.1", 1025, "::ffff:192.0.2.2", 25, 1),
    ),
    # v2 PROXY over TCP4 and TCP6, bare and followed by TLVs.
    (
        v2(0x21, 0x11, tcp4_block("192.0.2.1", "198.51.100.7", 40000, 25)),
        ProxyInfo("192.0.2.1", 40000, "198.51.100.7", 25, 2),
    ),
    (
        v2(0x21, 0x11, tcp4_block("192.0.2.1", "198.51.100.7", 40000, 25) + SOME_TLVS),
        ProxyInfo("192.0.2.1", 40000, "198.51.100.7", 25, 2),
    ),
    (
        v2(0x21, 0x21, tcp6_block("2001:db8::1", "2001:db8::25", 1, 587)),
        ProxyInfo("2001:db8::1", 1, "2001:db8::25", 587, 2),
    ),
    (
        v2(0x21, 0x21, tcp6_block("2001:db8::1", "2001:db8::25", 1, 587) + SOME_TLVS),
        ProxyInfo("2001:db8::1", 1, "2001:db8::25", 587, 2),
    ),
    (
        v2_with_crc(0x21, 0x11, tcp4_block("10.0.0.1", "10.0.0.2", 1234, 25) + SOME_TLVS),
        ProxyInfo("10.0.0.1", 1234, "10.0.0.2", 25, 2),
    ),
    # LOCAL: the block is discarded, whatever the family byte and contents.
    (v2(0x20, 0x00, b""), UNKNOWN_V2),
    (v2(0x20, 0x11, tcp4_block("192.0.2.1", "192.0.2.2", 1, 2) + SOME_TLVS), UNKNOWN_V2),
    (v2(0x20, 0x00, SOME_TLVS), UNKNOWN_V2),
    (v2(0x20, 0xFF, b"\xff" * 5), UNKNOWN_V2),
    # PROXY with the unspecified family: no address, TLVs still framed.
    (v2(0x21, 0x00, b""), UNKNOWN_V2),
    (v2(0x21, 0x00, SOME_TLVS), UNKNOWN_V2),
    # The largest accepted block.
    (
        v2(0x21, 0x11, tcp4_block("192.0.2.1", "192.0.2.2", 1, 2) + tlv(0x04, b"\x00" * 2033)),
        ProxyInfo("192.0.2.1", 1, "192.0.2.2", 2, 2),
    ),
]


def ids(header: bytes) -> str:
    return header[:40].decode("latin-1").encode("unicode_escape").decode()


@pytest.mark.parametrize(("header", "expected"), VALID, ids=[ids(h) for h, _ in VALID])
def test_valid_headers(header: bytes, expected: ProxyInfo) -> None:
    assert parse_proxy_header(header) == (expected, len(header))
    assert parse_proxy_header(bytearray(header + SMTP_AFTER)) == (expected, len(header))


def test_spec_sizes() -> None:
    """The spec's worst cases: 56 bytes for TCP4, 104 for TCP6, 107 for UNKNOWN."""
    assert len(VALID[0][0]) == 56
    assert len(VALID[1][0]) == 104
    assert len(VALID[3][0]) == 107
    assert len(VALID[-1][0]) == 16 + MAX_V2_PAYLOAD_BYTES


@pytest.mark.parametrize(("header", "expected"), VALID, ids=[ids(h) for h, _ in VALID])
def test_fed_one_byte_at_a_time(header: bytes, expected: ProxyInfo) -> None:
    stream = header + SMTP_AFTER
    buffer = bytearray()
    for i, byte in enumerate(stream):
        buffer.append(byte)
        result = parse_proxy_header(buffer)
        if i + 1 < len(header):
            assert result is None, i
        else:
            assert result == (expected, len(header))
            assert bytes(buffer[len(header) :]) == SMTP_AFTER[: i + 1 - len(header)]
    assert bytes(buffer[len(header) :]) == SMTP_AFTER


def test_empty_needs_more() -> None:
    assert parse_proxy_header(b"") is None


def test_is_unknown() -> None:
    assert UNKNOWN_V1.is_unknown and UNKNOWN_V2.is_unknown
    assert not VALID[0][1].is_unknown


TCP4 = tcp4_block("192.0.2.1", "192.0.2.2", 1, 2)
MALFORMED = [
    # Neither version.
    b"EHLO client.example\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"\x16\x03\x01\x02\x00",  # a TLS ClientHello
    b"proxy TCP4 192.0.2.1 192.0.2.2 1 2\r\n",
    b"PROXX TCP4",
    b"PROXY\r\n",
    b"\r\n\r\n\r\n",
    b"\x00",
    # v1 framing.
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\r\n",
    b"PROXY TCP4 192.0.2.1\r192.0.2.2 1 2\r\n",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\rX",
    b"PROXY UNKNOWN " + b"x" * 92,  # 106 bytes, no CRLF yet: line cannot end in time
    b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n",  # 108 bytes with its CRLF
    b"PROXY " + b"1" * 200,
    b"PROXY \r\n",
    b"PROXY  TCP4 192.0.2.1 192.0.2.2 1 2\r\n",
    b"PROXY TCP4  192.0.2.1 192.0.2.2 1 2\r\n",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 \r\n",
    b"PROXY TCP4 192.0.2.1\t192.0.2.2 1 2\r\n",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1\r\n",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 3\r\n",
    b"PROXY TCP5 192.0.2.1 192.0.2.2 1 2\r\n",
    b"PROXY UDP4 192.0.2.1 192.0.2.2 1 2\r\n",
    b"PROXY tcp4 192.0.2.1 192.0.2.2 1 2\r\n",
    b"PROXY UNKNOWNX\r\n",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1 \xff\r\n",
    # v1 addresses.
    b"PROXY TCP4 2001:db8::1 192.0.2.2 1 2\r\n",
    b"PROXY TCP4 192.0.2.1 ::ffff:192.0.2.2 1 2\r\n",
    b"PROXY TCP6 192.0.2.1 2001:db8::2 1 2\r\n",
    b"PROXY TCP6 2001:db8::1 192.0.2.2 1 2\r\n",
    b"PROXY TCP4 256.0.2.1 192.0.2.2 1 2\r\n",
    b"PROXY TCP4 192.0.2.01 192.0.2.2 1 2\r\n",
    b"PROXY TCP4 192.0.2 192.0.2.2 1 2\r\n",
    b"PROXY TCP4 mx.example 192.0.2.2 1 2\r\n",
    b"PROXY TCP4 3221225985 192.0.2.2 1 2\r\n",
    b"PROXY TCP6 2001:db8:::1 2001:db8::2 1 2\r\n",
    b"PROXY TCP6 fe80::1%eth0 2001:db8::2 1 2\r\n",
    b"PROXY TCP6 [2001:db8::1] 2001:db8::2 1 2\r\n",
    # v1 ports.
    b"PROXY TCP4 192.0.2.1 192.0.2.2 65536 2\r\n",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1 999999\r\n",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 -1 2\r\n",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 +1 2\r\n",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 01 2\r\n",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1a 2\r\n",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 0x19 2\r\n",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1_0 2\r\n",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 \xd9\xa1 2\r\n",  # Arabic-Indic digit one
    # v2 signature, version, command.
    b"\r\n\r\n\x00\r\nQUIX\n",
    b"\r\n\r\n\x01",
    b"\r\nEHLO",
    v2(0x11, 0x11, TCP4),
    v2(0x31, 0x11, TCP4),
    v2(0x01, 0x11, TCP4),
    v2(0x22, 0x11, TCP4),
    v2(0x2F, 0x11, TCP4),
    # v2 families.
    v2(0x21, 0x12, TCP4),  # UDP over IPv4
    v2(0x21, 0x22, tcp6_block("::1", "::2", 1, 2)),  # UDP over IPv6
    v2(0x21, 0x31, b"\x00" * 216),  # UNIX stream
    v2(0x21, 0x32, b"\x00" * 216),  # UNIX datagram
    v2(0x21, 0x01, b""),
    v2(0x21, 0x10, TCP4),
    v2(0x21, 0x13, TCP4),
    v2(0x21, 0x41, TCP4),
    v2(0x21, 0xFF, TCP4),
    # v2 lengths.
    v2(0x21, 0x11, TCP4[:11]),
    v2(0x21, 0x21, tcp6_block("::1", "::2", 1, 2)[:35]),
    v2(0x21, 0x11, b"", length=MAX_V2_PAYLOAD_BYTES + 1),
    v2(0x20, 0x00, b"", length=0xFFFF),
    # v2 TLV framing and checksum.
    v2(0x21, 0x11, TCP4 + b"\x04"),
    v2(0x21, 0x11, TCP4 + b"\x04\x00"),
    v2(0x21, 0x11, TCP4 + tlv(0x04, b"abc")[:-1]),
    v2(0x21, 0x11, TCP4 + b"\x04\x00\x05abcd"),
    v2(0x21, 0x00, b"\x01\x00\x10"),
    v2(0x21, 0x11, TCP4 + tlv(0x03, b"\x00\x00\x00")),
    v2_with_crc(0x21, 0x11, TCP4 + SOME_TLVS, corrupt=True),
    v2_with_crc(0x21, 0x11, TCP4, corrupt=True),
]


@pytest.mark.parametrize("data", MALFORMED, ids=[ids(d) for d in MALFORMED])
def test_malformed_raises(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(data)
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(data + SMTP_AFTER)
    # Fed in pieces, it never yields a header on the way to the error.
    for i in range(len(data)):
        with contextlib.suppress(ProxyHeaderError):
            assert parse_proxy_header(data[:i]) is None


@pytest.mark.parametrize("data", [b"E", b"\x16", b"PROXY_", b"\r\n\r\n\x00\r\nQ\x00", b"\r\r"])
def test_garbage_fails_early(data: bytes) -> None:
    """Bytes that are not a header fail as soon as they diverge, not after 107 bytes."""
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(data)


def test_v2_length_checked_before_payload_arrives() -> None:
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(v2(0x21, 0x11, b"", length=MAX_V2_PAYLOAD_BYTES + 1))
    assert parse_proxy_header(v2(0x21, 0x11, b"", length=MAX_V2_PAYLOAD_BYTES)) is None


def test_crc32c_oracle() -> None:
    """The test's own CRC-32C matches the published check value."""
    assert crc32c_bitwise(b"123456789") == 0xE3069283


# ---------------------------------------------------------------------------
# Building headers
# ---------------------------------------------------------------------------


def test_build_v1_examples() -> None:
    assert build_proxy_v1("192.0.2.1", 40000, "198.51.100.7", 25) == (
        b"PROXY TCP4 192.0.2.1 198.51.100.7 40000 25\r\n"
    )
    assert build_proxy_v1("2001:DB8::1", 1, "2001:db8::2", 2) == (
        b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n"
    )
    # Mixed families: TCP6, the IPv4 side IPv4-mapped.
    assert build_proxy_v1("2001:db8::1", 1, "192.0.2.2", 2) == (
        b"PROXY TCP6 2001:db8::1 ::ffff:192.0.2.2 1 2\r\n"
    )
    # Zone ids cannot travel.
    assert build_proxy_v1("fe80::1%eth0", 1, "fe80::2", 2) == b"PROXY TCP6 fe80::1 fe80::2 1 2\r\n"


@pytest.mark.parametrize(
    "args",
    [
        (None, 1, "192.0.2.2", 2),
        ("192.0.2.1", None, "192.0.2.2", 2),
        ("192.0.2.1", 1, None, 2),
        ("192.0.2.1", 1, "192.0.2.2", None),
    ],
)
def test_build_unknown(args: tuple[str | None, int | None, str | None, int | None]) -> None:
    assert build_proxy_v1(*args) == b"PROXY UNKNOWN\r\n"
    assert build_proxy_v2(*args) == V2_SIGNATURE + b"\x20\x00\x00\x00"
    assert parse_proxy_header(build_proxy_v1(*args)) == (UNKNOWN_V1, 15)
    assert parse_proxy_header(build_proxy_v2(*args)) == (UNKNOWN_V2, 16)


def test_build_v2_bytes() -> None:
    assert build_proxy_v2("192.0.2.1", 40000, "198.51.100.7", 25) == v2(
        0x21, 0x11, tcp4_block("192.0.2.1", "198.51.100.7", 40000, 25)
    )
    assert build_proxy_v2("2001:db8::1", 1, "192.0.2.2", 2) == v2(
        0x21, 0x21, tcp6_block("2001:db8::1", "::ffff:192.0.2.2", 1, 2)
    )


@pytest.mark.parametrize("build", [build_proxy_v1, build_proxy_v2])
@pytest.mark.parametrize(
    "args",
    [
        ("mx.example", 1, "192.0.2.2", 2),
        ("192.0.2.1", 1, "192.0.2.256", 2),
        ("192.0.2.1", -1, "192.0.2.2", 2),
        ("192.0.2.1", 1, "192.0.2.2", 65536),
        ("192.0.2.1", True, "192.0.2.2", 2),
    ],
)
def test_build_rejects_bad_endpoints(build: object, args: tuple[object, ...]) -> None:
    with pytest.raises(ValueError):
        build(*args)  # type: ignore[operator]


ports = st.integers(min_value=0, max_value=0xFFFF)


def expected_pair(
    src: ipaddress.IPv4Address | ipaddress.IPv6Address,
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    """What the header should say: the same addresses, or both as IPv6 if mixed."""
    if src.version == dst.version:
        return src, dst
    return tuple(
        a if a.version == 6 else ipaddress.IPv6Address("::ffff:" + str(a)) for a in (src, dst)
    )


@settings(max_examples=300)
@given(
    src=st.ip_addresses(),
    dst=st.ip_addresses(),
    sport=ports,
    dport=ports,
    version=st.sampled_from([1, 2]),
    tail=st.binary(max_size=40),
)
def test_build_parse_round_trip(
    src: ipaddress.IPv4Address | ipaddress.IPv6Address,
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address,
    sport: int,
    dport: int,
    version: int,
    tail: bytes,
) -> None:
    build = build_proxy_v1 if version == 1 else build_proxy_v2
    header = build(str(src), sport, str(dst), dport)
    assert len(header) <= (107 if version == 1 else 16 + 36)
    result = parse_proxy_header(header + tail)
    assert result is not None
    info, consumed = result
    assert consumed == len(header)
    assert info.version == version
    assert (info.source_port, info.dest_port) == (sport, dport)
    assert info.source_host is not None and info.dest_host is not None
    got = (ipaddress.ip_address(info.source_host), ipaddress.ip_address(info.dest_host))
    assert got == expected_pair(src, dst)
    # The text is canonical: parsing it again gives the same text.
    assert build(info.source_host, sport, info.dest_host, dport) == header


@given(
    src=st.ip_addresses(),
    dst=st.ip_addresses(),
    sport=ports,
    dport=ports,
    version=st.sampled_from([1, 2]),
    data=st.data(),
)
def test_any_split_gives_the_same_result(
    src: ipaddress.IPv4Address | ipaddress.IPv6Address,
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address,
    sport: int,
    dport: int,
    version: int,
    data: st.DataObject,
) -> None:
    build = build_proxy_v1 if version == 1 else build_proxy_v2
    header = build(str(src), sport, str(dst), dport)
    stream = header + SMTP_AFTER
    whole = parse_proxy_header(stream)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    buffer = bytearray()
    last = 0
    for cut in [*cuts, len(stream)]:
        buffer += stream[last:cut]
        last = cut
        result = parse_proxy_header(buffer)
        assert result == (whole if len(buffer) >= len(header) else None)


def outcome(data: bytes) -> object:
    try:
        return parse_proxy_header(data)
    except ProxyHeaderError:
        return ProxyHeaderError


noise = st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=150).map(lambda b: b"PROXY " + b),
    st.binary(max_size=150).map(lambda b: V2_SIGNATURE + b),
    st.tuples(st.sampled_from([0x20, 0x21]), st.sampled_from([0x00, 0x11, 0x21]), st.binary()).map(
        lambda t: V2_SIGNATURE + bytes(t[:2]) + struct.pack("!H", len(t[2])) + t[2]
    ),
    st.tuples(st.sampled_from(["TCP4", "TCP6", "UNKNOWN"]), st.text(max_size=90)).map(
        lambda t: f"PROXY {t[0]} {t[1]}\r\n".encode()
    ),
)


@settings(max_examples=400)
@given(noise)
def test_random_bytes_only_raise_proxy_header_error(data: bytes) -> None:
    """Any bytes: None, a result, or ProxyHeaderError; and each prefix agrees."""
    results = [outcome(data[:i]) for i in range(len(data) + 1)]
    for i, result in enumerate(results):
        if result is ProxyHeaderError:
            # An error is final: more bytes never make the header valid.
            assert all(r is ProxyHeaderError for r in results[i:])
        elif result is not None:
            assert isinstance(result, tuple)
            info, consumed = result
            assert isinstance(info, ProxyInfo)
            assert 0 < consumed <= i
            # A complete header stays the same whatever follows it.
            assert all(r == result for r in results[i:])
            assert results[consumed] == result


@given(st.binary(min_size=1, max_size=64))
def test_never_needs_more_than_the_bound(start: bytes) -> None:
    """With MAX_HEADER_BYTES in hand, the answer is never "send more"."""
    for lead in (b"", b"PROXY ", V2_SIGNATURE + b"\x21\x11", V2_SIGNATURE + b"\x20\x00\x08\x00"):
        data = (lead + start).ljust(MAX_HEADER_BYTES, b"\x00")
        assert outcome(data) is not None


# ---------------------------------------------------------------------------
# xtext and XCLIENT
# ---------------------------------------------------------------------------


def xtext_decode(text: str) -> bytes:
    """RFC 1891 xtext decoder, strict: rejects anything an encoder must not write."""
    out = bytearray()
    i = 0
    while i < len(text):
        char = text[i]
        if char == "+":
            digits = text[i + 1 : i + 3]
            assert re.fullmatch("[0-9A-F]{2}", digits), text
            out.append(int(digits, 16))
            i += 3
        else:
            assert "!" <= char <= "~" and char != "=", text
            out.append(ord(char))
            i += 1
    return bytes(out)


def test_xtext_examples() -> None:
    assert xtext_encode("mail.example.com") == "mail.example.com"
    assert xtext_encode("a+b=c d") == "a+2Bb+3Dc+20d"
    assert xtext_encode("x\r\nRCPT") == "x+0D+0ARCPT"
    assert xtext_encode("\x00\x7f") == "+00+7F"
    assert xtext_encode("é") == "+C3+A9"
    assert xtext_encode("") == ""
    assert xtext_encode("[UNAVAILABLE]") == "[UNAVAILABLE]"


@given(st.text())
def test_xtext_round_trip(text: str) -> None:
    encoded = xtext_encode(text)
    assert encoded.isascii()
    assert xtext_decode(encoded) == text.encode("utf-8")


@given(st.binary())
def test_xtext_round_trip_surrogateescape(raw: bytes) -> None:
    """Client bytes decoded with surrogateescape come back byte for byte."""
    assert xtext_decode(xtext_encode(raw.decode("utf-8", "surrogateescape"))) == raw


def test_xtext_never_raises_on_lone_surrogates() -> None:
    assert xtext_decode(xtext_encode("a\ud800b")) == b"a\xed\xa0\x80b"


def parse_xclient(lines: list[bytes]) -> list[dict[str, str]]:
    """Check the framing of each line and return its attributes."""
    parsed = []
    for line in lines:
        assert len(line) <= XCLIENT_MAX_LINE_BYTES
        assert line.endswith(b"\r\n") and line.count(b"\n") == 1 and line.count(b"\r") == 1
        words = line[:-2].decode("ascii").split(" ")
        assert words[0] == "XCLIENT" and len(words) > 1
        attrs: dict[str, str] = {}
        for word in words[1:]:
            name, _, value = word.partition("=")
            assert name in {"NAME", "ADDR", "PORT", "PROTO", "HELO", "LOGIN"}
            assert name not in attrs
            attrs[name] = value
        parsed.append(attrs)
    return parsed


def test_xclient_examples() -> None:
    assert build_xclient("192.0.2.1", 40000, "mail.example.com", "client.example", "ESMTP") == [
        b"XCLIENT HELO=client.example PROTO=ESMTP "
        b"NAME=mail.example.com ADDR=192.0.2.1 PORT=40000\r\n"
    ]
    assert build_xclient("2001:DB8::1") == [
        b"XCLIENT NAME=[UNAVAILABLE] ADDR=IPV6:2001:db8::1 PORT=[UNAVAILABLE]\r\n"
    ]
    # An IPv4 client on a dual-stack socket is sent as IPv4, as Postfix writes it.
    assert build_xclient("::ffff:192.0.2.1", 25, "[TEMPUNAVAIL]", proto="smtp", login="u+1") == [
        b"XCLIENT PROTO=SMTP LOGIN=u+2B1 NAME=[TEMPUNAVAIL] ADDR=192.0.2.1 PORT=25\r\n"
    ]
    assert build_xclient("[UNAVAILABLE]", helo="") == [
        b"XCLIENT HELO=[UNAVAILABLE] NAME=[UNAVAILABLE] ADDR=[UNAVAILABLE] PORT=[UNAVAILABLE]\r\n"
    ]


def test_xclient_helo_cannot_inject_commands() -> None:
    (line,) = build_xclient("192.0.2.1", 1, helo="x\r\nRCPT TO:<victim@example.org>")
    assert line == (
        b"XCLIENT HELO=x+0D+0ARCPT+20TO:<victim@example.org> "
        b"NAME=[UNAVAILABLE] ADDR=192.0.2.1 PORT=1\r\n"
    )


def test_xclient_splits_with_identity_last() -> None:
    lines = build_xclient("192.0.2.1", 1, "n" * 255, "h" * 255, "ESMTP", "l" * 255)
    attrs = parse_xclient(lines)
    assert len(lines) == 3
    assert attrs == [
        {"HELO": "h" * 255, "PROTO": "ESMTP"},
        {"LOGIN": "l" * 255},
        {"NAME": "n" * 255, "ADDR": "192.0.2.1", "PORT": "1"},
    ]


def test_xclient_overlong_values_are_unavailable() -> None:
    (line,) = build_xclient("192.0.2.1", 1, name="n" * 256, helo="+" * 86)
    assert parse_xclient([line]) == [
        {"HELO": "[UNAVAILABLE]", "NAME": "[UNAVAILABLE]", "ADDR": "192.0.2.1", "PORT": "1"}
    ]
    (line,) = build_xclient("192.0.2.1", 1, helo="+" * 85)
    assert parse_xclient([line])[0]["HELO"] == "+2B" * 85


@pytest.mark.parametrize(
    "kwargs",
    [
        {"addr": "mail.example.com"},
        {"addr": "192.0.2.256"},
        {"addr": ""},
        {"addr": "192.0.2.1", "port": 65536},
        {"addr": "192.0.2.1", "port": -1},
        {"addr": "192.0.2.1", "proto": "LMTP"},
        {"addr": "192.0.2.1", "proto": ""},
    ],
)
def test_xclient_rejects_bad_own_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        build_xclient(**kwargs)  # type: ignore[arg-type]


optional_text = st.none() | st.text(max_size=300)


@settings(max_examples=300)
@given(
    addr=st.ip_addresses(),
    port=st.none() | ports,
    name=optional_text,
    helo=optional_text,
    proto=st.none() | st.sampled_from(["SMTP", "ESMTP", "esmtp"]),
    login=optional_text,
)
def test_xclient_properties(
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address,
    port: int | None,
    name: str | None,
    helo: str | None,
    proto: str | None,
    login: str | None,
) -> None:
    lines = build_xclient(str(addr), port, name, helo, proto, login)
    parsed = parse_xclient(lines)
    # NAME, ADDR and PORT always, together, in the last line.
    assert {"NAME", "ADDR", "PORT"} <= parsed[-1].keys()
    assert all(not {"NAME", "ADDR", "PORT"} & p.keys() for p in parsed[:-1])
    merged: dict[str, str] = {}
    for p in parsed:
        assert not merged.keys() & p.keys()
        merged.update(p)

    if addr.version == 6 and addr.ipv4_mapped is None:
        assert merged["ADDR"] == f"IPV6:{addr}"
    else:
        v4 = addr if addr.version == 4 else addr.ipv4_mapped
        assert merged["ADDR"] == str(v4)
    assert merged["PORT"] == ("[UNAVAILABLE]" if port is None else str(port))
    assert ("PROTO" in merged) == (proto is not None)
    if proto is not None:
        assert merged["PROTO"] == proto.upper()

    for key, value, always in (
        ("NAME", name, True),
        ("HELO", helo, False),
        ("LOGIN", login, False),
    ):
        if value is None and not always:
            assert key not in merged
            continue
        sent = merged[key]
        if value is None or value == "" or len(xtext_encode(value)) > 255:
            assert sent == "[UNAVAILABLE]"
        else:
            assert xtext_decode(sent) == value.encode("utf-8")
