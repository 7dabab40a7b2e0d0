"""DERP frames (derp.py): the client-info frame and every frame after it.

Property: the frame parser raises nothing but ProtocolError (or
IncompleteReadError: the client went away mid-frame); on the live control,
a DERP connection sending anything - frames before the client info, short
frames, lengths of 0 and 2^32-1, unknown types, client info that does not
decrypt or is not a JSON object - is closed, nothing is logged as an internal
error, and relaying keeps working: two fresh clients exchange a packet after
every example, and a client connected before the fuzzing still receives.
"""
from __future__ import annotations

import asyncio
import json
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from nacl.public import Box, PrivateKey, PublicKey

from supervisor.control import derp
from tests.control.derp_client import (CLIENT_INFO, PING, PONG, RECV_PACKET, SEND_PACKET, SERVER_INFO,
                                       DerpClient, disco_like)
from tests.control.live_server import LiveControl
from tests.control.strategies import JSON, dumps

SERVER_PRIV = bytes(range(1, 33))
SERVER_PUB = bytes(PrivateKey(SERVER_PRIV).public_key)
CLIENT = PrivateKey(bytes(range(33, 65)))
TYPES = st.one_of(st.integers(0, 255), st.sampled_from([0x02, 0x04, 0x06, 0x07, 0x0A, 0x10, 0x11, 0x12, 0x13]))
LENGTHS = st.one_of(st.integers(0, 80), st.sampled_from([0, 1, 7, 8, 31, 32, 1000, 1001, 65568, 65569,
                                                         derp.MAX_FRAME_LEN + 1, 2**32 - 1]))


def frame(ftype: int, length: int, payload: bytes) -> bytes:
    """A frame header announcing `length`, whatever the payload really is."""
    return struct.pack(">BI", ftype, length) + payload


def sealed_info(body: bytes, key: PrivateKey = CLIENT, server: bytes = SERVER_PUB) -> bytes:
    """A client-info frame whose box really opens: `body` is what the server decrypts."""
    box = bytes(Box(key, PublicKey(server)).encrypt(body))
    return frame(CLIENT_INFO, 32 + len(box), bytes(key.public_key) + box)


FRAMES = st.one_of(
    st.builds(frame, TYPES, LENGTHS, st.binary(max_size=80)),
    st.binary(max_size=40).map(lambda p: frame(SEND_PACKET, len(p), p)),
    st.binary(max_size=40).map(lambda p: frame(PING, len(p), p)),
    st.binary(max_size=4).map(lambda p: frame(0x07, len(p), p)),
)
CLIENT_INFOS = st.one_of(
    FRAMES,
    st.binary(max_size=120).map(lambda p: frame(CLIENT_INFO, len(p), p)),
    st.one_of(JSON.map(dumps), st.binary(max_size=40)).map(sealed_info),
)


# -- the parser alone (a StreamReader fed with the bytes, no socket) -----------------------------


async def _parse(data: bytes, after_info: bool) -> None:
    server = derp.DerpServer(SERVER_PRIV)
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    try:
        if after_info:
            conn = derp._Conn(key=bytes(CLIENT.public_key), writer=None, name="fuzz")  # type: ignore[arg-type]
            server._register(conn)
            await server._recv_loop(reader, conn)
        else:
            key, _, info = await server._recv_client_info(reader)
            assert isinstance(info, dict)
            assert key == bytes(CLIENT.public_key)
    except (derp.ProtocolError, asyncio.IncompleteReadError):
        pass


@given(st.lists(CLIENT_INFOS, max_size=2).map(b"".join))
@example(frame(SEND_PACKET, 40, bytes(40))).via("a frame before the client info")
@example(frame(CLIENT_INFO, 2**32 - 1, b"")).via("client info of length 2^32-1")
@example(frame(CLIENT_INFO, 0, b"")).via("client info of length 0")
@example(sealed_info(b"[" * 100_000)).via("client info JSON nested too deeply")
@example(sealed_info(b"\xff\xfe")).via("client info not UTF-8")
@example(sealed_info(b'{"version": 2}') + b"garbage").via("a valid client info, then garbage")
def test_any_client_info_is_a_key_or_protocol_error(data: bytes) -> None:
    asyncio.run(_parse(data, after_info=False))


@given(st.lists(FRAMES, max_size=4).map(b"".join))
@example(frame(PING, 8, b"12345678") + b"\x05\x00").via("a valid frame, then a truncated header")
@example(frame(SEND_PACKET, 2**32 - 1, b"")).via("length 2^32-1")
@example(frame(SEND_PACKET, 3, b"abc")).via("a send shorter than a key")
@example(frame(0xFF, 0, b"")).via("an unknown type")
def test_any_frames_after_the_client_info_are_handled_or_protocol_error(data: bytes) -> None:
    asyncio.run(_parse(data, after_info=True))


# -- the live control's /derp --------------------------------------------------------------------


UPGRADE = b"GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n"


@pytest.fixture(scope="module")
def live() -> Iterator[tuple[LiveControl, DerpClient]]:
    with tempfile.TemporaryDirectory() as d, LiveControl(Path(d) / "control") as lc:
        lc.srv.derp = derp.DerpServer(SERVER_PRIV)  # a known key, so fuzzed client infos can open

        async def connect() -> DerpClient:
            c = await DerpClient.connect(lc.srv.port)
            await c.recv(SERVER_INFO)
            return c
        bystander = lc.run(connect())
        yield lc, bystander
        lc.run(bystander.close())


async def relay_works(port: int, to: DerpClient | None = None) -> None:
    """Two fresh clients (or a fresh one and `to`) exchange a packet, and the sender gets a pong."""
    async with asyncio.timeout(10):
        a = await DerpClient.connect(port)
        b = to or await DerpClient.connect(port)
        try:
            await a.recv(SERVER_INFO)
            if to is None:
                await b.recv(SERVER_INFO)
            await a.send(b.public_key, b"still relaying")
            a.send_frame(PING, b"12345678")
            assert (await a.recv(PONG)).payload == b"12345678"
        finally:
            await a.close()
    if to is None:
        try:
            assert (await b.recv(RECV_PACKET)).payload == a.public_key + b"still relaying"
        finally:
            await b.close()


async def send_and_wait_for_close(port: int, head: bytes, data: bytes, timeout: float = 5) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + data)
        writer.write_eof()
        await writer.drain()
    except ConnectionError:
        pass
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(65536):
                pass
    except ConnectionError:
        pass
    except TimeoutError:
        raise AssertionError("the server kept a bad DERP connection open") from None
    finally:
        writer.close()


@settings(max_examples=80)
@given(st.lists(CLIENT_INFOS, max_size=3).map(b"".join), st.booleans())
@example(frame(SEND_PACKET, 40, bytes(40)), False).via("a frame before the client info")
@example(frame(CLIENT_INFO, 2**32 - 1, b""), False).via("client info of length 2^32-1")
@example(b"[", True).via("fast start, then a truncated header")
def test_any_handshake_bytes_close_that_connection_only(live: Any, data: bytes, fast: bool) -> None:
    lc, bystander = live
    lc.clear()
    head = UPGRADE + (b"Derp-Fast-Start: 1\r\n" if fast else b"") + b"\r\n"
    asyncio.run(send_and_wait_for_close(lc.srv.port, head, data))
    lc.assert_healthy()
    asyncio.run(relay_works(lc.srv.port))
    lc.assert_healthy()


@settings(max_examples=80)
@given(st.lists(st.one_of(FRAMES, st.binary(max_size=30)), max_size=4).map(b"".join))
@example(frame(PING, 8, b"12345678") + b"\x05\x00").via("a valid frame, then a truncated header")
@example(frame(SEND_PACKET, 2**32 - 1, b"")).via("length 2^32-1")
@example(frame(0x10, 0, b"")).via("a mesh frame without a mesh key")
@example(frame(SEND_PACKET, 32 + 62, bytes(32) + disco_like())).via("disco to nobody")
def test_any_frames_after_the_client_info_close_that_connection_only(live: Any, data: bytes) -> None:
    lc, bystander = live
    lc.clear()

    async def go() -> None:
        c = await DerpClient.connect(lc.srv.port)
        # sometimes aimed at the bystander, so routing sees the fuzz too
        c.writer.write(data.replace(bytes(32), bystander.public_key))
        await send_and_wait_for_close_client(c)
    asyncio.run(go())
    lc.assert_healthy()
    asyncio.run(relay_works(lc.srv.port))
    lc.assert_healthy()


async def send_and_wait_for_close_client(c: DerpClient, timeout: float = 5) -> None:
    try:
        c.writer.write_eof()
        await c.writer.drain()
        assert await c.closed_by_server(timeout)
    except ConnectionError:
        pass
    except TimeoutError:
        raise AssertionError("the server kept a bad DERP connection open") from None
    finally:
        await c.close()


@settings(max_examples=60)
@given(st.one_of(JSON.map(dumps), st.binary(max_size=40),
                 st.just(b'{"version": 2, "CanAckPings": true}')), st.booleans())
@example(json.dumps({"version": 2, "meshKey": "ab" * 32}).encode(), False).via("claims a mesh key")
@example(json.dumps({"version": 2, "IsProber": True}).encode(), True).via("a prober, fast start")
def test_any_client_info_of_an_unregistered_key_gets_no_frame_and_a_close(live: Any, body: bytes,
                                                                           fast: bool) -> None:
    """With the control's own admission (registered node keys only), whatever the sealed
    ClientInfo says: not one frame after the server key, the connection closed, the key
    never served; the bystander and the relay unaffected."""
    lc, _ = live
    lc.clear()
    key = PrivateKey.generate()

    async def go() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", lc.srv.port)
        try:
            writer.write(UPGRADE + (b"Derp-Fast-Start: 1\r\n" if fast else b"") + b"\r\n")
            if not fast:
                await reader.readuntil(b"\r\n\r\n")
            _, n = struct.unpack(">BI", await reader.readexactly(5))
            server_key = (await reader.readexactly(n))[8:40]
            writer.write(sealed_info(body, key=key, server=server_key))
            rest = b""
            async with asyncio.timeout(5):
                try:
                    while chunk := await reader.read(65536):
                        rest += chunk
                except ConnectionError:
                    pass
            return rest
        finally:
            writer.close()

    admit_before = lc.srv.derp.admit
    lc.srv.derp.admit = lc.srv._admit_derp
    try:
        assert asyncio.run(go()) == b""
    finally:
        lc.srv.derp.admit = admit_before
    assert not lc.srv.derp.is_connected(bytes(key.public_key))
    lc.assert_healthy()
    asyncio.run(relay_works(lc.srv.port))
    lc.assert_healthy()


def test_zz_bystander_still_receives(live: Any) -> None:
    """Runs last in this file: a client connected before all the above still gets packets."""
    lc, bystander = live

    async def receive() -> None:
        await relay_works(lc.srv.port, to=bystander)

    async def heard() -> bytes:
        while True:
            f = await bystander.recv(RECV_PACKET, timeout=10)
            if f.payload.endswith(b"still relaying"):
                return f.payload
    asyncio.run(receive())
    assert lc.run(heard()).endswith(b"still relaying")
    lc.assert_healthy()


def test_client_info_json_of_any_shape_is_refused_or_accepted(live: Any) -> None:
    """The one client-info body a real client sends is accepted; a JSON non-object is not."""
    lc, _ = live

    async def go(body: bytes) -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", lc.srv.port)
        try:
            writer.write(UPGRADE + b"\r\n")
            await reader.readuntil(b"\r\n\r\n")
            ftype, n = struct.unpack(">BI", await reader.readexactly(5))
            server_key = (await reader.readexactly(n))[8:40]
            writer.write(sealed_info(body, server=server_key))
            async with asyncio.timeout(5):
                ftype, _ = struct.unpack(">BI", await reader.readexactly(5))
            return ftype == SERVER_INFO
        except asyncio.IncompleteReadError:
            return False
        finally:
            writer.close()
    assert asyncio.run(go(json.dumps({"version": 2, "CanAckPings": True}).encode()))
    assert not asyncio.run(go(b"[1, 2]"))
    assert not asyncio.run(go(b"[" * 100_000))
    lc.assert_healthy()
