"""ts2021, the control protocol: the Noise initiation and records (noise.py),
then the live server's front door (any HTTP/1 head, `/key`, the `/ts2021`
upgrade with any handshake header), any bytes after the handshake (records,
HTTP/2 frames) and register/map bodies of any shape.

Property: the pure functions raise nothing but NoiseError; the live server
answers an HTTP error or closes that one connection, never logs an internal
error, never lets an exception reach asyncio's handler, never answers 500,
and keeps serving: a bystander node's long poll started before the fuzzing
hears about a newcomer after it, and a fresh client registers and maps after
every example.
"""
from __future__ import annotations

import asyncio
import base64
import json
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hpack
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from supervisor.control import noise
from supervisor.control.tailnet import Tailnet
from tests.control.live_server import LiveControl, assert_node_json_decodes_in_go
from tests.control.strategies import JSON, dumps, mutated
from tests.control.ts2021_client import (Ts2021Client, http1, map_body, node_key, register_body,
                                         upgrade)

VERSION = 133
SERVER = bytes(range(1, 33))  # a fixed server key for the pure suites
CLIENT = bytes(range(33, 65))
SERVER_PUB = noise.public_key(SERVER)
VALID_INIT, _ = noise.initiate(CLIENT, SERVER_PUB, VERSION, ephemeral=bytes(range(65, 97)))
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
KEYS = st.one_of(st.binary(min_size=32, max_size=32),
                 st.sampled_from([bytes(32), b"\xff" * 32, b"\x01" + bytes(31)]))


# -- the pure functions ----------------------------------------------------------------------


def _with_header(version: int, mtype: int, length: int, body: bytes) -> bytes:
    return struct.pack(">HBH", version, mtype, length) + body


INITIATIONS = st.one_of(
    st.binary(max_size=120),
    st.binary(min_size=96, max_size=96).map(lambda b: _with_header(VERSION, 1, 96, b)),
    st.builds(_with_header, st.integers(0, 0xFFFF), st.integers(0, 255), st.integers(0, 0xFFFF),
              st.just(VALID_INIT[5:])),
    st.tuples(st.integers(0, 100), st.integers(0, 255)).map(
        lambda t: VALID_INIT[:t[0]] + bytes([VALID_INIT[t[0]] ^ (t[1] or 1)]) + VALID_INIT[t[0] + 1:]),
    st.builds(lambda e, body: _with_header(VERSION, 1, 96, e + body[32:]), KEYS, st.just(VALID_INIT[5:])),
)


@given(INITIATIONS)
@example(VALID_INIT[:100]).via("truncated initiation")
@example(VALID_INIT + b"\x00").via("initiation followed by garbage")
@example(_with_header(VERSION + 1, 1, 96, VALID_INIT[5:])).via("wrong protocol version")
@example(_with_header(VERSION, 1, 96, bytes(96))).via("all-zero ephemeral key")
@example(_with_header(VERSION, 1, 0, VALID_INIT[5:])).via("length field 0")
def test_any_initiation_is_answered_or_refused_with_noise_error(init: bytes) -> None:
    try:
        response, session = noise.respond(SERVER, init)
    except noise.NoiseError:
        return
    assert len(response) == noise.RESPONSE_LEN and session.machine_key == noise.public_key(CLIENT)


@given(KEYS, KEYS, st.integers(0, 0xFFFF))
def test_random_keys_and_versions_complete_the_handshake(client: bytes, eph: bytes, version: int) -> None:
    try:
        init, hs = noise.initiate(client, SERVER_PUB, version, ephemeral=eph)
    except noise.NoiseError:
        return  # a key the client itself cannot use
    response, server = noise.respond(SERVER, init)
    mine = noise.finish(hs, response, version)
    assert server.machine_key == noise.public_key(client)
    assert server.rx.decrypt(mine.tx.encrypt(b"ping")) == b"ping"


@given(st.binary(max_size=6))
@example(struct.pack(">BH", noise.MSG_RECORD, 0)).via("length 0")
@example(struct.pack(">BH", noise.MSG_RECORD, 0xFFFF)).via("length 2^16-1")
@example(b"\x04\x00").via("truncated header")
def test_any_record_header_is_a_length_or_noise_error(header: bytes) -> None:
    try:
        n = noise.parse_record_header(header)
    except noise.NoiseError:
        return
    assert 16 <= n <= noise.MAX_FRAME - 3


@given(st.binary(max_size=200), st.binary(max_size=60))
def test_any_record_or_response_bytes_are_noise_error(ciphertext: bytes, response: bytes) -> None:
    init, hs = noise.initiate(CLIENT, SERVER_PUB, VERSION)
    _, server = noise.respond(SERVER, init)
    with pytest.raises(noise.NoiseError):
        server.rx.decrypt(ciphertext)
    try:
        noise.finish(hs, response, VERSION)
    except noise.NoiseError:
        return
    raise AssertionError("a random response completed the handshake")


# -- the live server ---------------------------------------------------------------------------


class Bystander:
    """A node joined before the fuzzing, holding its long poll on the server's loop."""

    def __init__(self, live: LiveControl, secret: str) -> None:
        self.live, self.secret = live, secret
        self.client, self.nk, self.stream = live.run(self._join())

    async def _join(self) -> tuple[Ts2021Client, str, Any]:
        c = Ts2021Client(self.live.url)
        await c.__aenter__()
        nk = node_key()
        status, body = await c.post("/machine/register", register_body(nk, self.secret, "bystander"))
        assert status == 200, body
        stream = await c.map_stream(map_body(nk, "bystander"))
        assert (await stream.next_message(5) or {}).get("Node"), "no first map message"
        return c, nk, stream

    def assert_still_served(self) -> None:
        """A newcomer joins; the bystander's long poll (from before the fuzzing) hears of it."""
        nk = node_key()
        asyncio.run(good_client(self.live.url, self.secret, nk))

        async def heard() -> None:
            await self.stream.wait_for(lambda m: any(p["Key"] == nk for p in m.get("PeersChanged", [])), 10)
        self.live.run(heard())
        assert not self.client.closed.is_set()


@pytest.fixture(scope="module")
def live() -> Iterator[tuple[LiveControl, str, Bystander]]:
    with tempfile.TemporaryDirectory() as d, LiveControl(Path(d) / "control") as lc:
        secret = lc.admin("create_key", reusable=True)["secret"]
        bystander = Bystander(lc, secret)
        yield lc, secret, bystander
        lc.run(bystander.client.close())


GOOD_MACHINE = bytes(range(140, 172))
GOOD_NK = "nodekey:" + "6b" * 32


async def good_client(url: str, secret: str, nk: str = GOOD_NK) -> None:
    """A well-behaved node: register, then the first map message carries its Node.
    (One node, registered again and again, so the tailnet does not grow with the examples.)"""
    machine = GOOD_MACHINE if nk == GOOD_NK else None
    async with asyncio.timeout(10), Ts2021Client(url, machine) as c:
        status, body = await c.post("/machine/register", register_body(nk, secret, "good"))
        assert status == 200 and json.loads(body)["MachineAuthorized"] is True, body
        ms = await c.map_stream(map_body(nk, "good"))
        assert ms.status == 200
        first = await ms.next_message(5)
        assert first and first["Node"]["Key"] == nk


def after_bad_input(live: LiveControl, secret: str) -> None:
    live.assert_healthy()
    asyncio.run(good_client(live.url, secret))
    live.assert_healthy()


async def send_and_wait_for_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                  data: bytes, timeout: float = 5) -> bytes:
    """Send, half-close, and read until the server closes; AssertionError if it never does."""
    try:
        writer.write(data)
        writer.write_eof()
        await writer.drain()
    except ConnectionError:
        pass  # the server already closed on an earlier byte
    out = bytearray()
    try:
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                out += chunk
    except ConnectionError:
        pass
    except TimeoutError:
        raise AssertionError("the server kept a bad connection open") from None
    finally:
        writer.close()
    return bytes(out)


def _head(method: str, target: str, headers: list[tuple[str, str]]) -> bytes:
    return (f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
            + "\r\n").encode("utf-8", "surrogatepass")


HEADS = st.one_of(
    st.binary(max_size=300),
    st.builds(_head, st.sampled_from(["GET", "POST", "HEAD", "PRI", "", "GET GET"]),
              st.one_of(st.sampled_from(["/key", "/key?v=133", "/ts2021", "/derp", "/generate_204",
                                         "/admin/keys", "/admin/nodes/1/delete", "//[x/", "http://[::1",
                                         "/derp/probe", "*"]), st.text(max_size=30)),
              st.lists(st.tuples(st.sampled_from(["Upgrade", "Connection", "X-Tailscale-Handshake",
                                                  "Content-Length", "Authorization", "Derp-Fast-Start"]),
                                 st.text(max_size=30)), max_size=4)),
)


@settings(max_examples=60)
@given(HEADS)
@example(b"GET //[x/ HTTP/1.1\r\n\r\n").via("an unbalanced IPv6 host in the target")
@example(b"GET http://[::1 HTTP/1.1\r\n\r\n").via("an unbalanced IPv6 URL")
@example(b"GET / HTTP/1.1\r\nno colon here\r\n\r\n").via("a header line without a colon")
@example(b"GET /" + b"a" * 40000 + b" HTTP/1.1\r\n\r\n").via("a head over the limit")
@example(b"POST /admin/keys HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n").via("huge length, no token")
def test_any_request_head_gets_an_answer_or_a_close(live: Any, head: bytes) -> None:
    lc, secret, bystander = live
    lc.clear()

    async def go() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", lc.srv.port)
        return await send_and_wait_for_close(reader, writer, head, timeout=15)
    answer = asyncio.run(go())
    fast_derp = b"\x01\x00\x00\x00\x28DERP"  # Derp-Fast-Start: the server key frame, no HTTP head
    assert answer == b"" or answer.startswith((b"HTTP/1.1 ", fast_derp)), answer[:80]
    assert not answer.startswith(b"HTTP/1.1 500"), answer[:200]
    after_bad_input(lc, secret)


def test_key_endpoint_serves_the_noise_key(live: Any) -> None:
    lc, _, _ = live
    status, body = asyncio.run(http1(lc.url, "GET", "/key?v=999999999999999999999&v=x"))
    assert status == 200 and json.loads(body)["publicKey"].startswith("mkey:")


HANDSHAKES = st.one_of(
    INITIATIONS.map(lambda b: base64.b64encode(b).decode()),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=200),
    st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode()),
)


@settings(max_examples=60)
@given(HANDSHAKES)
@example("").via("no handshake at all")
@example("!!!not base64!!!").via("not base64")
@example("é" * 10).via("not ASCII")
@example(None).via("wrong protocol version in the header")
def test_any_upgrade_handshake_is_refused_with_400(live: Any, value: str | None) -> None:
    lc, secret, _ = live
    lc.clear()
    wrong_version = value is None
    if value is None:  # a real initiation whose header names another version than its prologue
        init, _ = noise.initiate(noise.generate_private(), noise.public_key(lc.srv._private), VERSION)
        value = base64.b64encode(struct.pack(">H", VERSION + 1) + init[2:]).decode()
    status, body = asyncio.run(http1(lc.url, "POST", "/ts2021", headers={
        "Connection": "upgrade", "Upgrade": "tailscale-control-protocol", "X-Tailscale-Handshake": value}))
    assert status in ((400,) if wrong_version else (101, 400)), (status, body)
    after_bad_input(lc, secret)


def _frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", sid) + payload


def _headers_frame(sid: int, headers: list[tuple[bytes, bytes]], flags: int) -> bytes:
    return _frame(0x1, flags | 0x4, sid, hpack.Encoder().encode(headers))


H2_FRAMES = st.one_of(
    st.builds(_frame, st.integers(0, 12), st.integers(0, 255), st.sampled_from([0, 1, 2, 3, 0x7FFFFFFF]),
              st.binary(max_size=40)),
    st.builds(_headers_frame, st.sampled_from([1, 3, 2]),
              st.lists(st.tuples(st.sampled_from([b":method", b":path", b":scheme", b":authority",
                                                  b"content-length", b"x"]), st.binary(max_size=12)),
                       max_size=5), st.sampled_from([0, 1])),
)


def _records(pieces: list[bytes]) -> list[tuple[str, bytes]]:
    return [("plain", p) for p in pieces]


AFTER_HANDSHAKE = st.one_of(
    st.binary(max_size=200).map(lambda b: [("raw", b)]),
    st.lists(st.tuples(st.integers(0, 255), st.sampled_from([0, 1, 15, 16, 4093, 4094, 0xFFFF]),
                       st.binary(max_size=64)), min_size=1, max_size=3).map(
        lambda rs: [("raw", struct.pack(">BH", t, n) + b) for t, n, b in rs]),
    st.lists(st.binary(max_size=64), min_size=1, max_size=3).map(_records),
    st.lists(H2_FRAMES, max_size=4).map(lambda fs: [("plain", PREFACE + _frame(0x4, 0, 0, b"") + b"".join(fs))]),
    st.tuples(st.binary(max_size=40)).map(lambda t: [("plain", PREFACE), ("raw", t[0])]),
)


@settings(max_examples=80)
@given(AFTER_HANDSHAKE)
@example([("raw", struct.pack(">BH", 4, 0))]).via("record of length 0")
@example([("raw", struct.pack(">BH", 4, 0xFFFF) + bytes(100))]).via("record of length 2^16-1, truncated")
@example([("plain", PREFACE), ("raw", b"\x04\x00\x20garbage")]).via("a valid record, then garbage")
@example([("plain", PREFACE + _frame(0x4, 0, 0, b"") + _headers_frame(1, [(b":path", b"\xff\xfe")], 1))]
         ).via("a request path that is not UTF-8")
def test_any_bytes_after_the_handshake_close_that_connection(live: Any, parts: list[tuple[str, bytes]]) -> None:
    lc, secret, _ = live
    lc.clear()

    async def go() -> None:
        reader, writer, session = await upgrade(lc.url, noise.generate_private())
        data = b"".join(noise.seal(session.tx, p) if kind == "plain" else p for kind, p in parts)
        await send_and_wait_for_close(reader, writer, data)
    asyncio.run(go())
    after_bad_input(lc, secret)


NK0 = "nodekey:" + "5a" * 32
SECRET0 = "SECRET-PLACEHOLDER"
REGISTER = register_body(NK0, SECRET0, "fuzz", Expiry="0001-01-01T00:00:00Z",
                         NLKey="nlpub:" + "00" * 32, Ephemeral=False)
REGISTER["Hostinfo"] = {"Hostname": "fuzz", "OS": "linux",
                        "Services": [{"Proto": "peerapi4", "Port": 1, "Description": "x"}]}
MAP = map_body(NK0, "fuzz", Endpoints=["127.0.0.1:1"], OmitPeers=False)
MAP["Hostinfo"]["NetInfo"] = {"PreferredDERP": 900}
BODIES = st.one_of(
    st.tuples(st.just("/machine/register"), mutated(REGISTER).map(dumps)),
    st.tuples(st.just("/machine/map"), mutated(MAP).map(dumps)),
    st.tuples(st.sampled_from(["/machine/register", "/machine/map", "/machine/set-dns", "/other"]),
              st.one_of(JSON.map(dumps), st.binary(max_size=80),
                        st.binary(max_size=40).map(lambda b: b"\x28\xb5\x2f\xfd" + b))),
)


def _holds_for_followup(body: bytes) -> bool:
    try:
        req = json.loads(body)
    except ValueError:
        return False
    return isinstance(req, dict) and isinstance(req.get("Followup"), str) and bool(req["Followup"])


@settings(max_examples=100)
@given(BODIES)
@example(("/machine/register", b'{"NodeKey": ')).via("truncated JSON")
@example(("/machine/map", dumps({**MAP, "Hostinfo": {"NetInfo": {"PreferredDERP": float("inf")}}}))
         ).via("PreferredDERP Infinity")
@example(("/machine/map", dumps({**MAP, "Hostinfo": {"NetInfo": {"PreferredDERP": 1e300}}}))
         ).via("PreferredDERP 1e300")
@example(("/machine/map", dumps({**MAP, "DiscoKey": {"a": 1}}))).via("DiscoKey an object")
@example(("/machine/map", dumps({**MAP, "Endpoints": {"1.2.3.4:5": 1}}))).via("Endpoints an object")
@example(("/machine/map", dumps({**MAP, "Endpoints": 5}))).via("Endpoints a number")
@example(("/machine/map", dumps({**MAP, "Hostinfo": {"OS": 5}}))).via("Hostinfo.OS a number")
@example(("/machine/register", dumps({**REGISTER, "Hostinfo": "x"}))).via("Hostinfo a string")
@example(("/machine/register", dumps({**REGISTER, "Auth": {"AuthKey": 5}}))).via("AuthKey a number")
@example(("/machine/register", dumps({**REGISTER, "Expiry": 5}))).via("Expiry a number")
@example(("/machine/register", dumps({**REGISTER, "Expiry": "0000-01-01T00:00:00Z"}))).via("year 0")
@example(("/machine/register", dumps({**REGISTER, "OldNodeKey": [1]}))).via("OldNodeKey a list")
@example(("/machine/register", b"[" * 50_000)).via("deep nesting")
def test_any_register_or_map_body_gets_a_client_error_not_500(live: Any, case: tuple[str, bytes]) -> None:
    lc, secret, _ = live
    lc.clear()
    path, body = case
    body = body.replace(SECRET0.encode(), secret.encode())
    machine = bytes(range(100, 132))  # NK0 always belongs to this machine

    async def go() -> None:
        async with asyncio.timeout(20), Ts2021Client(lc.url, machine) as c:
            status, answer = await c.post("/machine/register", register_body(NK0, secret, "fuzz"))
            assert status == 200, answer
            stream = await c._request(path, body)
            try:
                async with asyncio.timeout(5):
                    status = await stream.status
            except TimeoutError:
                assert path == "/machine/register" and _holds_for_followup(body), "no answer"
                return
            assert status in (200, 400, 403, 404), (status, bytes(stream.data)[:200])
            # the same session still serves a good request
            status, answer = await c.post("/machine/register", register_body(NK0, secret, "again"))
            assert status == 200 and json.loads(answer)["MachineAuthorized"] is True, answer
    asyncio.run(go())
    lc.assert_healthy()

    async def netmap_nodes() -> list[dict[str, Any]]:
        return [lc.srv._node_json(n) for n in lc.srv.tailnet.nodes.values()]
    for node in lc.run(netmap_nodes()):  # what every peer is sent about each node
        assert_node_json_decodes_in_go(node)
    Tailnet(lc.srv.tailnet.path)  # and the state as saved still loads


def test_zz_bystander_was_served_throughout(live: Any) -> None:
    """Runs last in this file: the long poll opened before all the above still works."""
    lc, _, bystander = live
    lc.clear()
    bystander.assert_still_served()
    lc.assert_healthy()
