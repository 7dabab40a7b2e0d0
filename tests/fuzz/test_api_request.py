"""Fuzz the embedded control's /api/v2/ (supervisor/control/api.py) with hostile requests.

One live control (tests/control/live_server.py) with two nodes, an OAuth client
and tag owners serves every example. A request is built from API-shaped parts
(methods, paths with odd ids, Authorization headers that are valid, garbage or
a client secret, Content-Length that lies, bodies that are valid with one spot
changed or any bytes) or is any bytes. Property: it costs one answer, 200 or
4xx with a JSON body `{"message", "status"}` (the token endpoint: RFC 6749
`{"error"}`), or a close; never a 5xx, an exception in the server's loop or
an ERROR log line. After each example the control still answers the real API
client, and its state.json still loads.
"""
from __future__ import annotations

import asyncio
import base64
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import example, given, strategies as st

from supervisor.control import tailnet as tn
from supervisor.tsapi import Client, Credential
from tests.control.live_server import LiveControl
from tests.control.strategies import JSON, mutated
from tests.control.ts2021_client import node_key, register_body


class World:
    def __init__(self, live: LiveControl) -> None:
        self.live = live
        srv = live.srv
        self.admin = srv.api_credential().secret
        made = srv.admin("create_oauth_client", scopes=["auth_keys", "devices:core"], tags=["tag:web"])
        self.client_secret = made["secret"]
        srv.admin("set_tag_owners", owners={"tag:db": ["tag:web"]})
        key = srv.admin("create_key", reusable=True, tags=["tag:web"])

        async def join() -> list[tn.Node]:
            nodes = []
            for host in ("web", "db"):
                r = srv.tailnet.register(register_body(node_key(), key["secret"], host),
                                         "mkey:" + "ab" * 32, srv.url)
                assert r.node is not None
                nodes.append(r.node)
            return nodes
        nodes = live.run(join())
        self.ids = [str(n.id) for n in nodes] + [n.stable_id for n in nodes]
        self.key_id = key["id"]

        async def token() -> str:
            c = Client(srv.url, Credential("oauth", self.client_secret))
            await c.devices()
            return c._token
        self.access = asyncio.run(token())


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with tempfile.TemporaryDirectory() as d, LiveControl(Path(d) / "control") as live:
        yield World(live)


_id = st.one_of(st.sampled_from(["0", "1", "2", "999999999999999999999", "-1", "n", "nCNTRL", "%2F..",
                                 "..", "%00", "k1", "%", "a%zz", "é"]),
                st.text(max_size=12).map(lambda t: t.replace(" ", "%20").replace("?", "").replace("#", "")))
_path = st.one_of(
    st.builds(lambda t: f"/api/v2/tailnet/{t}/devices", st.sampled_from(["-", "tailnet.test", "x", ""])),
    st.builds(lambda t, k: f"/api/v2/tailnet/{t}/keys" + (f"/{k}" if k else ""), st.sampled_from(["-", "z"]),
              st.one_of(st.just(""), _id)),
    st.builds(lambda i, tail: f"/api/v2/device/{i}{tail}", _id,
              st.sampled_from(["", "/ip", "/name", "/tags", "/routes", "/", "/ip/x"])),
    st.sampled_from(["/api/v2/oauth/token", "/api/v2/", "/api/v2//device//", "/api/v2/device",
                     "/api/v2/oauth/token?x=1", "/api/v2/tailnet/-/devices?fields=all"]),
)
_body = st.one_of(
    st.just(b""), st.binary(max_size=80),
    st.sampled_from([b"[" * 30000, b'{"ipv4": "100.64.0.9"}', b'{"name": "web"}', b'{"tags": ["tag:db"]}',
                     b"grant_type=client_credentials", b"grant_type=client_credentials&" + b"a=1&" * 40]),
    st.one_of(JSON, mutated({"capabilities": {"devices": {"create": {
        "reusable": False, "ephemeral": True, "preauthorized": True, "tags": ["tag:web"]}}},
        "expirySeconds": 600, "description": "x"}), mutated({"ipv4": "100.64.1.2"}),
        mutated({"name": "renamed"}), mutated({"tags": ["tag:web"]})).map(lambda v: json.dumps(v).encode()),
)


_request = st.tuples(st.sampled_from(["GET", "POST", "DELETE", "PUT", "HEAD", "get", "POST "]), _path, _body,
                     st.sampled_from(["admin", "access", "client", "none", "garbage", "basic", "basic-bad"]),
                     st.sampled_from(["exact", "exact", "short", "long", "none", "junk", "chunked", "huge"]))


def _build(w: World, method: str, path: str, body: bytes, auth: str, length: str) -> bytes:
    headers = {"admin": f"Authorization: Bearer {w.admin}", "access": f"Authorization: Bearer {w.access}",
               "client": f"Authorization: Bearer {w.client_secret}", "none": "",
               "garbage": "Authorization: Bearer \x7f\x00nope",
               "basic": "Authorization: Basic " + base64.b64encode(f"id:{w.client_secret}".encode()).decode(),
               "basic-bad": "Authorization: Basic ###"}[auth]
    lengths = {"exact": f"Content-Length: {len(body)}", "short": f"Content-Length: {max(0, len(body) - 3)}",
               "long": f"Content-Length: {len(body) + 5}", "none": "", "junk": "Content-Length: -1",
               "chunked": "Transfer-Encoding: chunked", "huge": "Content-Length: 99999999999"}[length]
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\n" + "".join(f"{h}\r\n" for h in (headers, lengths) if h)
    return head.encode("utf-8", "surrogateescape") + b"\r\n" + body


async def _send(url: str, data: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        writer.write_eof()  # a lying Content-Length meets EOF, not a wait
        return await asyncio.wait_for(reader.read(), 15)
    except ConnectionError:
        return b""
    finally:
        writer.close()


def check(world: World, data: bytes) -> None:
    live = world.live
    live.clear()
    out = asyncio.run(_send(live.url, data))
    if out:
        head, _, body = out.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        assert 200 <= status < 500, out[:300]
        if b"/api/v2/" in data.split(b"\r\n", 1)[0] and b"Content-Type: application/json" in head:
            answer = json.loads(body) if body else None
            if status >= 400:
                assert isinstance(answer, dict) and (
                    isinstance(answer.get("message"), str) and answer.get("status") == status
                    or isinstance(answer.get("error"), str)), answer
    live.assert_healthy()

    async def still_serves() -> int:
        return len(await Client(live.url, live.srv.api_credential()).devices())
    asyncio.run(still_serves())
    tn.Tailnet(live.srv.tailnet.path)  # the state on disk still loads


def test_built_requests_cost_one_answer(world: World) -> None:
    for args in (("POST", "/api/v2/device/1/ip", b'{"ipv4": 5}', "admin", "exact"),
                 ("POST", "/api/v2/tailnet/-/keys", b"[" * 30000, "access", "exact"),
                 ("POST", "/api/v2/oauth/token", b"grant_type=client_credentials&" + b"a=1&" * 40, "basic", "exact"),
                 ("GET", "/api/v2/device/%ff%fe", b"", "admin", "none"),
                 ("POST", "/api/v2/device/2/name", b'{"name": "x"}', "admin", "short"),
                 ("POST", "/api/v2/tailnet/-/keys", b'{"expirySeconds": 1e999}', "admin", "exact"),
                 ("POST", "/api/v2/tailnet/-/keys", b'{"capabilities":{"devices":{"create":{"tags":[1]}}}}',
                  "access", "exact"),
                 ("DELETE", "/api/v2/tailnet/-/keys/%2e%2e", b"", "admin", "long")):
        check(world, _build(world, *args))


@given(_request)
@example(("POST", "/api/v2/device/1/tags", b'{"tags"', "admin", "short"))
def test_any_built_request_costs_one_answer(world: World, parts: tuple) -> None:
    check(world, _build(world, *parts))


@given(st.binary(max_size=200))
@example(b" HTTP/1.1\r\nContent-Length: 5\r\n\r\n{\"tags\"")
def test_any_bytes_after_the_api_prefix_cost_one_answer(world: World, tail: bytes) -> None:
    check(world, b"POST /api/v2/" + tail)
