"""A STUN responder on loopback for the DERP region's STUNPort.

Without STUN answers tailscaled's netcheck decides "UDP is blocked" and
picks its home DERP only after ≈5 s of fallback probes; with them, start-up
takes ≈25 ms (facts §3). tailscaled sends RFC 5389 binding requests (net/stun
Request: SOFTWARE "tailnode" + FINGERPRINT) and its ParseResponse needs only a
0x0101 success header with its transaction id and an XOR-MAPPED-ADDRESS,
which is exactly what net/stun Response (used by cmd/derper) sends.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import struct
import zlib

log = logging.getLogger(__name__)

MAGIC_COOKIE = b"\x21\x12\xa4\x42"
HEADER_LEN = 20
BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
ATTR_XOR_MAPPED_ADDRESS = 0x0020
ATTR_FINGERPRINT = 0x8028
FINGERPRINT_XOR = 0x5354554E


def is_stun(b: bytes) -> bool:
    """stun.Is: long enough, top two bits zero, magic cookie in place."""
    return len(b) >= HEADER_LEN and b[0] & 0xC0 == 0 and b[4:8] == MAGIC_COOKIE


def fingerprint(b: bytes) -> int:
    return zlib.crc32(b) ^ FINGERPRINT_XOR


def parse_binding_request(b: bytes) -> bytes | None:
    """The transaction id of a well-formed binding request, else None.

    Stricter than the header check alone so that garbage gets no answer:
    the length field must match, attributes must be well formed, and a
    FINGERPRINT, if present, must be last and correct. (Unlike cmd/derper we
    do not insist on SOFTWARE "tailnode", so any STUN client can probe us.)
    """
    if not is_stun(b) or struct.unpack_from(">H", b, 0)[0] != BINDING_REQUEST:
        return None
    (length,) = struct.unpack_from(">H", b, 2)
    if length != len(b) - HEADER_LEN or length % 4:
        return None
    pos = HEADER_LEN
    while pos < len(b):
        if len(b) - pos < 4:
            return None
        attr, alen = struct.unpack_from(">HH", b, pos)
        end = pos + 4 + ((alen + 3) & ~3)
        if end > len(b):
            return None
        if attr == ATTR_FINGERPRINT:
            if alen != 4 or end != len(b):
                return None
            if struct.unpack_from(">I", b, pos + 4)[0] != fingerprint(b[:pos]):
                return None
        pos = end
    return b[8:20]


def binding_response(txid: bytes, host: str, port: int) -> bytes:
    """net/stun Response: a success header and one XOR-MAPPED-ADDRESS."""
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    raw = ip.packed
    family = 1 if len(raw) == 4 else 2
    xor_key = MAGIC_COOKIE + txid
    xaddr = bytes(a ^ k for a, k in zip(raw, xor_key))
    attr = struct.pack(">HHBBH", ATTR_XOR_MAPPED_ADDRESS, 4 + len(raw), 0, family,
                       port ^ 0x2112) + xaddr
    return struct.pack(">HH", BINDING_SUCCESS, len(attr)) + MAGIC_COOKIE + txid + attr


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        txid = parse_binding_request(data)
        if txid is None or self.transport is None:
            return  # garbage: no answer, no log (anyone on loopback can send it)
        try:
            self.transport.sendto(binding_response(txid, addr[0], addr[1]), addr)
        except (OSError, ValueError) as e:
            log.debug("stun: cannot answer %s: %s", addr, e)

    def error_received(self, exc: Exception) -> None:
        # e.g. ICMP port unreachable from a prober that already left; keep serving
        log.debug("stun: %s", exc)


class StunServer:
    """Answers STUN binding requests on a loopback UDP port."""

    def __init__(self) -> None:
        self._transport: asyncio.DatagramTransport | None = None
        self.port: int = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Bind (loopback only) and return the UDP port."""
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"STUN server must listen on loopback, not {host}")
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(_Protocol, local_addr=(host, port))
        self._transport = transport
        self.port = transport.get_extra_info("sockname")[1]
        return self.port

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
