"""DerpServer against a DERP client written from Tailscale's client code
(tests/control/derp_client.py), behind a bare HTTP/1.1 acceptor. No tailscaled."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
from nacl.public import PrivateKey

from supervisor.control.derp import DerpServer
from tests.control.derp_client import (KEEP_ALIVE, PEER_GONE, PING, PONG, RECV_PACKET,
                                       SEND_PACKET, SERVER_INFO, SERVER_KEY, DerpClient,
                                       disco_like, start_http_front)


def run(test: Callable[..., Awaitable[None]], **server_opts) -> None:
    """Run one async test body against a fresh DerpServer on loopback."""

    async def main() -> None:
        async with derp_server(**server_opts) as (server, port):
            try:
                async with asyncio.timeout(30):
                    await test(server, port)
            finally:
                await DerpClient.close_all()

    asyncio.run(main())


@asynccontextmanager
async def derp_server(**opts) -> AsyncIterator[tuple[DerpServer, int]]:
    server = DerpServer(**opts)
    front, port = await start_http_front(server.handle)
    try:
        yield server, port
    finally:
        await server.close()
        front.close()
        await front.wait_closed()


async def until(pred: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


async def ping(c: DerpClient, data: bytes = b"12345678") -> None:
    """Prove the connection still works end to end."""
    c.send_frame(PING, data)
    await c.writer.drain()
    assert (await c.recv(PONG)).payload == data


def test_handshake_upgrade_server_key_and_server_info() -> None:
    key = PrivateKey.generate()

    async def body(server: DerpServer, port: int) -> None:
        c = await DerpClient.connect(port)
        head = c.http_head.decode()
        assert head.startswith("HTTP/1.1 101 Switching Protocols\r\n")
        assert "Upgrade: DERP\r\n" in head and "Derp-Version: 2\r\n" in head
        assert f"Derp-Public-Key: {bytes(key.public_key).hex()}\r\n" in head
        assert c.server_key == server.public_key == bytes(key.public_key)
        info = await c.recv(SERVER_INFO)
        assert c.open_server_info(info.payload) == {"version": 2}
        await until(lambda: server.is_connected(c.public_key), 2, "client registered")
        await c.close()
        await until(lambda: not server.is_connected(c.public_key), 2, "client unregistered")

    run(body, private_key=bytes(key))


def test_fast_start_skips_http_response() -> None:
    async def body(server: DerpServer, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: DERP\r\n"
                     b"Connection: Upgrade\r\nDerp-Fast-Start: 1\r\n\r\n")
        first = await reader.readexactly(5 + 40)
        assert first[0] == SERVER_KEY and struct.unpack(">I", first[1:5])[0] == 40
        assert first[13:45] == server.public_key
        c = DerpClient(reader, writer, PrivateKey.generate())
        c.server_key = server.public_key
        c.send_frame(0x02, c.public_key + bytes(c._box.encrypt(b'{"version":2}')))
        assert c.open_server_info((await c.recv(SERVER_INFO)).payload)["version"] == 2
        await c.close()

    run(body)


def test_packet_from_a_reaches_b_with_a_as_source() -> None:
    async def body(server: DerpServer, port: int) -> None:
        a, b = await DerpClient.connect(port), await DerpClient.connect(port)
        await until(lambda: server.is_connected(b.public_key), 2, "B registered")
        await a.send(b.public_key, b"hello from A")
        f = await b.recv(RECV_PACKET)
        assert f.payload[:32] == a.public_key and f.payload[32:] == b"hello from A"
        await b.send(a.public_key, b"reply")
        f = await a.recv(RECV_PACKET)
        assert f.payload == b.public_key + b"reply"
        big = os.urandom(64 << 10)  # MaxPacketSize is allowed
        await a.send(b.public_key, big)
        assert (await b.recv(RECV_PACKET)).payload == a.public_key + big

    run(body)


def test_unknown_destination_keeps_everything_working() -> None:
    async def body(server: DerpServer, port: int) -> None:
        a, b = await DerpClient.connect(port), await DerpClient.connect(port)
        await until(lambda: server.is_connected(b.public_key), 2, "B registered")
        nobody = bytes(PrivateKey.generate().public_key)
        await a.send(nobody, b"not disco: dropped silently")
        await a.send(nobody, disco_like(b"ping"))
        gone = await a.recv(PEER_GONE)  # the real server answers disco with "not here"
        assert gone.payload == nobody + b"\x01"
        await a.send(b.public_key, b"still relaying")
        assert (await b.recv(RECV_PACKET)).payload == a.public_key + b"still relaying"
        await ping(a)

    run(body)


def test_peer_gone_when_sender_disconnects() -> None:
    async def body(server: DerpServer, port: int) -> None:
        a, b = await DerpClient.connect(port), await DerpClient.connect(port)
        await until(lambda: server.is_connected(b.public_key), 2, "B registered")
        await a.send(b.public_key, b"x")
        await b.recv(RECV_PACKET)
        await a.close()
        assert (await b.recv(PEER_GONE)).payload == a.public_key + b"\x00"

    run(body)


def test_ping_pong_and_keepalive() -> None:
    async def body(server: DerpServer, port: int) -> None:
        a = await DerpClient.connect(port)
        await ping(a, b"\x00\x01\x02\x03\x04\x05\x06\x07")
        t0 = time.monotonic()
        await a.recv(KEEP_ALIVE, timeout=3)
        assert time.monotonic() - t0 < 3

    run(body, keepalive=0.3)


@pytest.mark.parametrize("garbage", [
    pytest.param(struct.pack(">BI", SEND_PACKET, 0xFFFFFFFF), id="oversize-length"),
    pytest.param(struct.pack(">BI", SEND_PACKET, 32 + (64 << 10) + 1), id="packet-too-big"),
    pytest.param(struct.pack(">BI", SEND_PACKET, 5) + b"short", id="short-send"),
    pytest.param(struct.pack(">BI", PING, 3) + b"abc", id="short-ping"),
    pytest.param(struct.pack(">BI", 0x07, 2) + b"\x01\x01", id="bad-note-preferred"),
    pytest.param(struct.pack(">BI", 0x10, 0), id="watch-conns-without-mesh-key"),
    pytest.param(b"\x05\x00", id="truncated-header"),
])
def test_garbage_frame_closes_only_that_connection(garbage: bytes,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="supervisor.control.derp")

    async def body(server: DerpServer, port: int) -> None:
        a, b = await DerpClient.connect(port), await DerpClient.connect(port)
        bad = await DerpClient.connect(port)
        await bad.recv(SERVER_INFO)
        await until(lambda: server.client_count == 3, 2, "three clients")
        bad.writer.write(garbage)
        if garbage == b"\x05\x00":
            bad.writer.write_eof()
        await bad.writer.drain()
        assert await bad.closed_by_server()
        await until(lambda: not server.is_connected(bad.public_key), 2, "bad client dropped")
        await a.send(b.public_key, b"unaffected")
        assert (await b.recv(RECV_PACKET)).payload == a.public_key + b"unaffected"
        await ping(a)

    run(body)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("derp: closing 127.0.0.1:"), lines


def test_bad_handshakes_are_refused() -> None:
    async def body(server: DerpServer, port: int) -> None:
        a = await DerpClient.connect(port)
        # 1. Not an upgrade: 426, as derpserver.Handler does.
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert (await r.read()).startswith(b"HTTP/1.1 426 ")
        w.close()
        await w.wait_closed()
        # 2. Client info sealed to the wrong key.
        c = await DerpClient.connect(port, server_key=bytes(PrivateKey.generate().public_key))
        assert await c.closed_by_server()
        # 3. Random bytes instead of client info.
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /derp HTTP/1.1\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n"
                + b"\x7f" + os.urandom(299))  # not a client-info frame
        await r.readuntil(b"\r\n\r\n")
        await r.readexactly(45)  # server key frame
        assert await r.read() == b""
        w.close()
        await w.wait_closed()
        # 4. The probe path netcheck uses without UDP.
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"HEAD /derp/probe HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert (await r.read()).startswith(b"HTTP/1.1 200 OK")
        w.close()
        await w.wait_closed()
        assert server.client_count == 1
        await ping(a)

    run(body)


def test_stalled_reader_is_bounded_and_does_not_stall_others() -> None:
    async def body(server: DerpServer, port: int) -> None:
        a, b, c = [await DerpClient.connect(port) for _ in range(3)]
        await until(lambda: server.client_count == 3, 2, "three clients")
        # b never reads again; a floods it (far more than socket buffers hold).
        pkt = os.urandom(60_000)
        for _ in range(500):
            await a.send(b.public_key, pkt)
        await a.send(c.public_key, b"for c")
        assert (await c.recv(RECV_PACKET)).payload == a.public_key + b"for c"
        # The real server gives a non-reading client a 2 s write timeout.
        await until(lambda: not server.is_connected(b.public_key), 10, "stalled client dropped")
        await ping(a)

    run(body, queue_depth=8)


def test_duplicate_key_last_connection_is_active() -> None:
    async def body(server: DerpServer, port: int) -> None:
        key = PrivateKey.generate()
        a = await DerpClient.connect(port)
        old = await DerpClient.connect(port, key)
        await until(lambda: server.client_count == 2, 2, "two clients")
        new = await DerpClient.connect(port, key)
        await until(lambda: server.client_count == 3, 2, "three clients")
        await a.send(new.public_key, b"to newest")
        assert (await new.recv(RECV_PACKET)).payload == a.public_key + b"to newest"
        await new.close()
        await until(lambda: server.client_count == 2, 2, "newest gone")
        await a.send(old.public_key, b"to remaining")
        assert (await old.recv(RECV_PACKET)).payload == a.public_key + b"to remaining"

    run(body)


def test_close_ends_all_clients() -> None:
    async def body(server: DerpServer, port: int) -> None:
        clients = [await DerpClient.connect(port) for _ in range(3)]
        await until(lambda: server.client_count == 3, 2, "three clients")
        await server.close()
        for c in clients:
            assert await c.closed_by_server()
        assert server.client_count == 0

    run(body)


def test_fifty_idle_clients_cost_nothing() -> None:
    async def body(server: DerpServer, port: int) -> None:
        clients = [await DerpClient.connect(port) for _ in range(50)]
        await until(lambda: server.client_count == 50, 5, "fifty clients")
        for c in clients:
            await c.recv(SERVER_INFO)
        cpu0 = time.process_time()
        await asyncio.sleep(1.0)  # measuring idle cost: the sleep is the measurement window
        assert time.process_time() - cpu0 < 0.05
        await clients[0].send(clients[49].public_key, b"still awake")
        assert (await clients[49].recv(RECV_PACKET)).payload[32:] == b"still awake"

    run(body)


def test_client_info_json_is_accepted_as_go_sends_it() -> None:
    """Go's ClientInfo JSON: {"version":2,"CanAckPings":true} plus optional fields."""
    async def body(server: DerpServer, port: int) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        c = DerpClient(r, w, PrivateKey.generate())
        w.write(b"GET /derp HTTP/1.1\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
        await r.readuntil(b"\r\n\r\n")
        c.server_key = (await c.recv_raw()).payload[8:40]
        info = json.dumps({"version": 2, "CanAckPings": True, "IsProber": False}).encode()
        c.send_frame(0x02, c.public_key + bytes(c._box.encrypt(info)))
        assert c.open_server_info((await c.recv(SERVER_INFO)).payload) == {"version": 2}

    run(body)
