"""StunServer against requests built byte for byte like tailscaled's
net/stun.Request, and responses parsed like net/stun.ParseResponse."""
from __future__ import annotations

import asyncio
import os
import socket
import struct
import zlib

import pytest

from supervisor.control.stun import StunServer

MAGIC_COOKIE = b"\x21\x12\xa4\x42"


def tailscale_request(txid: bytes) -> bytes:
    """net/stun.Request (v1.78.1 and v1.96.4 are identical): binding request,
    SOFTWARE "tailnode", FINGERPRINT = crc32(preceding bytes) ^ 0x5354554e."""
    software = b"tailnode"
    b = b"\x00\x01" + struct.pack(">H", (4 + len(software)) + 8) + MAGIC_COOKIE + txid
    b += struct.pack(">HH", 0x8022, len(software)) + software
    fp = zlib.crc32(b) ^ 0x5354554E
    return b + struct.pack(">HHI", 0x8028, 4, fp)


def parse_response(b: bytes) -> tuple[bytes, str, int]:
    """net/stun.ParseResponse: success header, then XOR-MAPPED-ADDRESS."""
    assert len(b) >= 20 and b[0] & 0xC0 == 0 and b[4:8] == MAGIC_COOKIE, "not STUN"
    txid = b[8:20]
    assert b[0:2] == b"\x01\x01", "not a success response"
    (attrs_len,) = struct.unpack(">H", b[2:4])
    attrs = b[20:20 + attrs_len]
    assert len(attrs) == attrs_len, "malformed attrs"
    while attrs:
        atype, alen = struct.unpack(">HH", attrs[:4])
        val = attrs[4:4 + alen]
        if atype in (0x0020, 0x8020):
            fam, xport = val[1], struct.unpack(">H", val[2:4])[0]
            n = {1: 4, 2: 16}[fam]
            key = MAGIC_COOKIE + txid
            ip = bytes(a ^ k for a, k in zip(val[4:4 + n], key))
            return txid, socket.inet_ntop(socket.AF_INET if n == 4 else socket.AF_INET6, ip), xport ^ 0x2112
        attrs = attrs[4 + ((alen + 3) & ~3):]
    raise AssertionError("no XOR-MAPPED-ADDRESS")


async def exchange(sock: socket.socket, port: int, payload: bytes, timeout: float = 2) -> bytes | None:
    """Send one datagram and return the answer, or None if none came in time."""
    loop = asyncio.get_running_loop()
    sock.sendto(payload, ("127.0.0.1", port))
    try:
        async with asyncio.timeout(timeout):
            return await loop.sock_recv(sock, 2048)
    except TimeoutError:
        return None


@pytest.fixture
def udp() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    yield s
    s.close()


def test_binding_request_gets_xor_mapped_address_of_sender(udp: socket.socket) -> None:
    async def body() -> None:
        server = StunServer()
        port = await server.start()
        try:
            assert port > 0
            for _ in range(3):
                txid = os.urandom(12)
                got_txid, ip, p = parse_response(await exchange(udp, port, tailscale_request(txid)))
                assert (got_txid, ip, p) == (txid, "127.0.0.1", udp.getsockname()[1])
        finally:
            server.close()

    asyncio.run(body())


def test_garbage_is_ignored_and_server_keeps_answering(udp: socket.socket) -> None:
    txid = os.urandom(12)
    good = tailscale_request(txid)
    bad_fp = good[:-1] + bytes([good[-1] ^ 0xFF])
    garbage = [
        b"",
        b"\x00",
        os.urandom(700),
        good[:19],                                   # short header
        b"\x01\x01" + good[2:],                      # a response, not a request
        good[:4] + b"\x00\x00\x00\x00" + good[8:],   # wrong magic cookie
        bad_fp,                                      # wrong fingerprint
        good[:2] + b"\x00\x40" + good[4:],           # length field lies
        good[:-3],                                   # truncated attribute
    ]

    async def body() -> None:
        server = StunServer()
        port = await server.start()
        try:
            for g in garbage:
                assert await exchange(udp, port, g, timeout=0.2) is None, g
            got_txid, ip, p = parse_response(await exchange(udp, port, good))
            assert (got_txid, ip, p) == (txid, "127.0.0.1", udp.getsockname()[1])
        finally:
            server.close()

    asyncio.run(body())


def test_plain_rfc5389_request_without_attributes_is_answered(udp: socket.socket) -> None:
    """Not only tailscaled: any STUN binding request (e.g. `stunclient`) gets an answer."""
    async def body() -> None:
        server = StunServer()
        port = await server.start()
        try:
            txid = os.urandom(12)
            req = b"\x00\x01\x00\x00" + MAGIC_COOKIE + txid
            assert parse_response(await exchange(udp, port, req))[0] == txid
        finally:
            server.close()

    asyncio.run(body())


def test_refuses_non_loopback_address() -> None:
    async def body() -> None:
        with pytest.raises(ValueError, match="loopback"):
            await StunServer().start("0.0.0.0")

    asyncio.run(body())
