"""Test helpers: a DERP client written from Tailscale's derp_client.go and
derphttp_client.go, and a bare HTTP/1.1 acceptor that hands `GET /derp` to a
DerpServer the way the control's front end does.

The client is deliberately independent of supervisor.control.derp (its own
constants and framing), so the tests check the server against the protocol,
not against itself.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import struct
from dataclasses import dataclass

from nacl.public import Box, PrivateKey, PublicKey

MAGIC = b"DERP\xf0\x9f\x94\x91"
DISCO_MAGIC = b"TS\xf0\x9f\x92\xac"

SERVER_KEY, CLIENT_INFO, SERVER_INFO = 0x01, 0x02, 0x03
SEND_PACKET, RECV_PACKET, KEEP_ALIVE, NOTE_PREFERRED, PEER_GONE = 0x04, 0x05, 0x06, 0x07, 0x08
PING, PONG = 0x12, 0x13


def disco_like(payload: bytes = b"") -> bytes:
    """A packet that passes disco.LooksLikeDiscoWrapper (magic + key + nonce)."""
    return DISCO_MAGIC + bytes(32) + bytes(24) + payload


@dataclass
class Frame:
    type: int
    payload: bytes


class DerpClient:
    """One DERP client connection (derphttp without TLS, as with TS_DEBUG_USE_DERP_HTTP)."""

    open: set["DerpClient"] = set()  # so a test harness can close what a test left open

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 key: PrivateKey) -> None:
        self.reader, self.writer, self.key = reader, writer, key
        DerpClient.open.add(self)
        self.public_key = bytes(key.public_key)
        self.server_key = b""
        self.http_head = b""

    @classmethod
    async def connect(cls, port: int, key: PrivateKey | None = None, *,
                      fast_start: bool = False, server_key: bytes | None = None,
                      can_ack_pings: bool = True) -> "DerpClient":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        c = cls(reader, writer, key or PrivateKey.generate())
        await c.handshake(fast_start=fast_start, server_key=server_key, can_ack_pings=can_ack_pings)
        return c

    async def handshake(self, *, fast_start: bool = False, server_key: bytes | None = None,
                        can_ack_pings: bool = True) -> None:
        head = ("GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: Go-http-client/1.1\r\n"
                "Connection: Upgrade\r\nUpgrade: DERP\r\n")
        if fast_start:
            head += "Derp-Fast-Start: 1\r\n"
        self.writer.write((head + "\r\n").encode())
        if not fast_start:
            self.http_head = await self.reader.readuntil(b"\r\n\r\n")
            if not self.http_head.startswith(b"HTTP/1.1 101 "):
                raise AssertionError(f"no upgrade: {self.http_head!r}")
        if server_key is None:
            f = await self.recv_raw()
            if f.type != SERVER_KEY or f.payload[:8] != MAGIC or len(f.payload) < 40:
                raise AssertionError(f"invalid server greeting {f}")
            server_key = f.payload[8:40]
        self.server_key = server_key
        info = json.dumps({"version": 2, "CanAckPings": can_ack_pings}).encode()
        sealed = bytes(self._box.encrypt(info))
        self.send_frame(CLIENT_INFO, self.public_key + sealed)
        await self.writer.drain()

    @property
    def _box(self) -> Box:
        return Box(self.key, PublicKey(self.server_key))

    def open_server_info(self, payload: bytes) -> dict:
        return json.loads(self._box.decrypt(payload))

    def send_frame(self, ftype: int, payload: bytes = b"") -> None:
        self.writer.write(struct.pack(">BI", ftype, len(payload)) + payload)

    async def send(self, dst: bytes, pkt: bytes) -> None:
        self.send_frame(SEND_PACKET, dst + pkt)
        await self.writer.drain()

    async def recv_raw(self, timeout: float = 5) -> Frame:
        async with asyncio.timeout(timeout):
            t, n = struct.unpack(">BI", await self.reader.readexactly(5))
            return Frame(t, await self.reader.readexactly(n))

    async def recv(self, *types: int, timeout: float = 5) -> Frame:
        """The next frame of one of `types`, skipping keep-alives and others."""
        async with asyncio.timeout(timeout):
            while True:
                f = await self.recv_raw(timeout=timeout)
                if f.type in types:
                    return f

    async def closed_by_server(self, timeout: float = 5) -> bool:
        """True once the server has closed this connection (EOF or reset)."""
        async with asyncio.timeout(timeout):
            try:
                while await self.reader.read(65536):
                    pass
            except ConnectionError:
                pass
        return True

    async def close(self) -> None:
        DerpClient.open.discard(self)
        self.writer.transport.abort()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()

    @classmethod
    async def close_all(cls) -> None:
        for c in list(cls.open):
            await c.close()


async def start_http_front(handler, host: str = "127.0.0.1") -> tuple[asyncio.Server, int]:
    """A bare HTTP/1.1 acceptor: reads the request head and calls
    handler(reader, writer, method, path, headers) with lower-cased header
    names, as the control's front end does for GET /derp."""

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            await handler(reader, writer, method, path, headers)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            writer.close()

    server = await asyncio.start_server(on_conn, host, 0)
    return server, server.sockets[0].getsockname()[1]
