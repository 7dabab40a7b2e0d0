"""ControlServer in-process against the Python ts2021 client (tests/control/ts2021_client.py).
No tailscaled, no network namespace: everything is on loopback inside one event loop."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import ipaddress
import json
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from supervisor.control import noise
from supervisor.control.server import ControlServer, admin_socket_path
from supervisor.control.tailnet import NO_CAPS, Tailnet
from tests.control.ts2021_client import (HTTPError, MapStream, Ts2021Client, http1, map_body,
                                         node_key, register_body, server_public_key, upgrade)

V4 = ipaddress.ip_network("100.64.0.0/10")
V6 = ipaddress.ip_network("fd7a:115c:a1e0::/48")


def run(tmp_path: Path, body: Callable[[ControlServer, contextlib.AsyncExitStack], Awaitable[None]],
        **opts: Any) -> None:
    """Run one async test body against a fresh ControlServer; clients opened on the stack close first."""

    async def main() -> None:
        srv = ControlServer(tmp_path / "control", **opts)
        await srv.start()
        try:
            async with contextlib.AsyncExitStack() as stack, asyncio.timeout(30):
                await body(srv, stack)
        finally:
            await srv.stop()

    asyncio.run(main())


class Joined:
    def __init__(self, client: Ts2021Client, nk: str, hostname: str, stream: MapStream,
                 first: dict[str, Any]) -> None:
        self.client, self.nk, self.hostname, self.stream, self.first = client, nk, hostname, stream, first


async def register(srv: ControlServer, stack: contextlib.AsyncExitStack, secret: str, hostname: str,
                   machine_private: bytes | None = None) -> tuple[Ts2021Client, str]:
    c = await stack.enter_async_context(Ts2021Client(srv.url, machine_private))
    nk = node_key()
    status, body = await c.post("/machine/register", register_body(nk, secret, hostname))
    assert status == 200, body
    resp = json.loads(body)
    assert resp.get("MachineAuthorized") is True, resp
    assert not resp.get("Error")
    return c, nk


async def join(srv: ControlServer, stack: contextlib.AsyncExitStack, secret: str, hostname: str,
               machine_private: bytes | None = None) -> Joined:
    """Register and open a map stream; the first message must carry the node."""
    c, nk = await register(srv, stack, secret, hostname, machine_private)
    ms = await c.map_stream(map_body(nk, hostname))
    assert ms.status == 200
    first = await ms.next_message(5)
    assert first is not None and first["Node"]["Key"] == nk
    return Joined(c, nk, hostname, ms, first)


def node_id(srv: ControlServer, nk: str) -> int:
    return next(n["id"] for n in srv.admin("list_nodes") if n["node_key"] == nk)


def peers_changed_with(nk: str) -> Callable[[dict[str, Any]], bool]:
    return lambda m: any(p["Key"] == nk for p in m.get("PeersChanged", []))


# -- register, map, peers, delete ---------------------------------------------------------


def test_register_map_peers_and_delete(tmp_path: Path) -> None:
    async def body(srv: ControlServer, stack: contextlib.AsyncExitStack) -> None:
        secret = srv.admin("create_key", reusable=True)["secret"]
        a = await join(srv, stack, secret, "alpha")
        node = a.first["Node"]
        v4, v6 = (ipaddress.ip_interface(x).ip for x in node["Addresses"])
        assert v4 in V4 and v6 in V6
        regions = a.first["DERPMap"]["Regions"]
        assert regions and all(r["Nodes"] for r in regions.values())
        assert "Peers" not in a.first  # alone in the tailnet

        b = await join(srv, stack, secret, "beta")
        assert [p["Key"] for p in b.first["Peers"]] == [a.nk]
        changed = await a.stream.wait_for(peers_changed_with(b.nk), 5)
        assert changed["PeersChanged"][0]["Name"] == "beta.tailnet.test."

        bid = node_id(srv, b.nk)
        srv.admin("delete_node", id=bid)
        removed = await a.stream.wait_for(lambda m: bid in m.get("PeersRemoved", []), 5)
        assert "PeersChanged" not in removed or all(p["ID"] != bid for p in removed["PeersChanged"])
        # the deleted node's long poll is ended, and its next map request is refused
        while await b.stream.next_message(5) is not None:
            pass
        assert await b.client.post("/machine/map", map_body(b.nk, "beta")) == (404, b"node not found")
        assert [n["hostname"] for n in srv.admin("list_nodes")] == ["alpha"]

    run(tmp_path, body)


# -- bad input: a clean error for the bad connection, service for everyone else ----------------


async def closed_by_server(reader: asyncio.StreamReader, timeout: float = 5) -> bool:
    """True if the server closes the connection (EOF or reset) within the timeout."""
    try:
        await asyncio.wait_for(reader.read(-1), timeout)
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    except TimeoutError:
        return False
    return True


async def raw_handshake(url: str, value: str) -> tuple[int, bytes]:
    return await http1(url, "POST", "/ts2021", headers={
        "Connection": "upgrade", "Upgrade": "tailscale-control-protocol",
        "X-Tailscale-Handshake": value})


async def case_garbage_request_line(srv: ControlServer, stack: contextlib.AsyncExitStack,
                                    a: Joined, secret: str) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(b"GARBAGE\r\n\r\n")
    data = await asyncio.wait_for(reader.read(-1), 5)
    writer.close()
    assert data.startswith(b"HTTP/1.1 400 "), data


async def case_handshake_not_base64(srv: ControlServer, stack: contextlib.AsyncExitStack,
                                    a: Joined, secret: str) -> None:
    status, body = await raw_handshake(srv.url, "!!!not base64!!!")
    assert status == 400 and body.startswith(b"bad X-Tailscale-Handshake"), body


async def case_truncated_initiation(srv: ControlServer, stack: contextlib.AsyncExitStack,
                                    a: Joined, secret: str) -> None:
    init, _ = noise.initiate(noise.generate_private(), await server_public_key(srv.url), 133)
    status, body = await raw_handshake(srv.url, base64.b64encode(init[:100]).decode())
    assert status == 400 and body.startswith(b"handshake failed"), body


async def case_wrong_server_key(srv: ControlServer, stack: contextlib.AsyncExitStack,
                                a: Joined, secret: str) -> None:
    wrong = noise.public_key(noise.generate_private())
    with pytest.raises(HTTPError) as e:
        await upgrade(srv.url, noise.generate_private(), server_public=wrong)
    assert e.value.status == 400 and e.value.body.startswith(b"handshake failed"), e.value


async def case_oversized_record(srv: ControlServer, stack: contextlib.AsyncExitStack,
                                a: Joined, secret: str) -> None:
    reader, writer, _ = await upgrade(srv.url, noise.generate_private())
    writer.write(struct.pack(">BH", noise.MSG_RECORD, 4094))  # 4097-byte frame
    writer.write(bytes(4094))
    assert await closed_by_server(reader)
    writer.close()


async def case_truncated_record_then_eof(srv: ControlServer, stack: contextlib.AsyncExitStack,
                                         a: Joined, secret: str) -> None:
    reader, writer, _ = await upgrade(srv.url, noise.generate_private())
    writer.write(struct.pack(">BH", noise.MSG_RECORD, 64) + bytes(20))
    writer.write_eof()
    assert await closed_by_server(reader)
    writer.close()


async def case_corrupted_tag(srv: ControlServer, stack: contextlib.AsyncExitStack,
                             a: Joined, secret: str) -> None:
    reader, writer, session = await upgrade(srv.url, noise.generate_private())
    record = bytearray(noise.seal(session.tx, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"))
    record[-1] ^= 0x01
    writer.write(bytes(record))
    assert await closed_by_server(reader)
    writer.close()


async def case_malformed_register_json(srv: ControlServer, stack: contextlib.AsyncExitStack,
                                       a: Joined, secret: str) -> None:
    c = await stack.enter_async_context(Ts2021Client(srv.url))
    status, body = await c.post("/machine/register", b'{"NodeKey": ')
    assert status == 400 and body.startswith(b"bad request"), body
    # the same session still serves a good request
    status, body = await c.post("/machine/register", register_body(node_key(), secret, "fine"))
    assert status == 200 and json.loads(body)["MachineAuthorized"] is True


async def case_register_foreign_node_key(srv: ControlServer, stack: contextlib.AsyncExitStack,
                                         a: Joined, secret: str) -> None:
    c = await stack.enter_async_context(Ts2021Client(srv.url))
    status, body = await c.post("/machine/register", register_body(a.nk, secret, "thief"))
    assert status == 403, body
    assert [n["hostname"] for n in srv.admin("list_nodes") if n["node_key"] == a.nk] == ["alpha"]


async def case_map_foreign_node_key(srv: ControlServer, stack: contextlib.AsyncExitStack,
                                    a: Joined, secret: str) -> None:
    c = await stack.enter_async_context(Ts2021Client(srv.url))
    status, body = await c.post("/machine/map", map_body(a.nk, "thief"))
    assert status == 403, body


BAD_CASES = [case_garbage_request_line, case_handshake_not_base64, case_truncated_initiation,
             case_wrong_server_key, case_oversized_record, case_truncated_record_then_eof,
             case_corrupted_tag, case_malformed_register_json, case_register_foreign_node_key,
             case_map_foreign_node_key]


@pytest.mark.parametrize("case", BAD_CASES, ids=[c.__name__.removeprefix("case_") for c in BAD_CASES])
def test_bad_input_is_refused_and_others_keep_being_served(tmp_path: Path, case: Any) -> None:
    async def body(srv: ControlServer, stack: contextlib.AsyncExitStack) -> None:
        secret = srv.admin("create_key", reusable=True)["secret"]
        a = await join(srv, stack, secret, "alpha")
        await case(srv, stack, a, secret)
        # A's session and long poll are untouched: a new node shows up on A's stream...
        c = await join(srv, stack, secret, "gamma")
        await a.stream.wait_for(peers_changed_with(c.nk), 5)
        # ...and an admin change to A itself reaches A
        srv.admin("expire_node", id=node_id(srv, a.nk))
        msg = await a.stream.wait_for(lambda m: "Node" in m and m["Node"]["Key"] == a.nk, 5)
        assert msg["Node"]["Expired"] is True
        assert not a.client.closed.is_set()

    run(tmp_path, body)


# -- admin over HTTP on the admin socket ------------------------------------------------------


def admin_url(srv: ControlServer) -> str:
    return f"unix:{admin_socket_path(srv.data_dir)}"


def test_admin_http(tmp_path: Path) -> None:
    async def body(srv: ControlServer, stack: contextlib.AsyncExitStack) -> None:
        async def admin(method: str, path: str, data: bytes = b"") -> tuple[int, Any]:
            status, raw = await http1(admin_url(srv), method, path, data)
            return status, json.loads(raw)

        status, key = await admin("POST", "/admin/keys", b'{"reusable": true}')
        assert status == 200 and key["reusable"] is True and key["secret"].startswith("tskey-auth-")
        _, nk = await register(srv, stack, key["secret"], "via-http")

        status, nodes = await admin("GET", "/admin/nodes")
        assert status == 200 and [(n["hostname"], n["node_key"]) for n in nodes] == [("via-http", nk)]
        status, keys = await admin("GET", "/admin/keys")
        assert status == 200 and [k["id"] for k in keys] == [key["id"]]
        assert all("secret" not in k and "secret_hash" not in k for k in keys)

        status, deleted = await admin("POST", f"/admin/nodes/{nodes[0]['id']}/delete")
        assert status == 200 and deleted["id"] == nodes[0]["id"]
        assert await admin("GET", "/admin/nodes") == (200, [])

        status, err = await admin("POST", f"/admin/nodes/{nodes[0]['id']}/delete")
        assert status == 404 and "error" in err
        status, err = await admin("GET", "/admin/nope")
        assert status == 404 and "no admin route" in err["error"]
        status, err = await admin("POST", "/admin/keys", b"{not json")
        assert status == 400 and err["error"].startswith("bad request")
        status, err = await admin("POST", "/admin/keys", b"[1, 2]")
        assert status == 400 and "error" in err
        assert [k["id"] for k in srv.admin("list_keys")] == [key["id"]]  # no key made by the 400s

    run(tmp_path, body)


@pytest.mark.parametrize("path,data", [
    ("/admin/keys", b'{"expiry": 1e999}'), ("/admin/keys", b'{"expiry": NaN}'),
    ("/admin/keys", b'{"expiry": -5}'), ("/admin/keys", b'{"tags": [5]}'), ("/admin/keys", b'{"tags": 5}'),
    ("/admin/keys", b"[" * 60_000), ("/admin/fault", b'{"status": 1e999}'),
    ("/admin/fault", b'{"status": "x"}'), ("/admin/fault", b'{"status": 200}'),
    ("/admin/keys", b'{"user": 5}'), ("/admin/keys", b'{"user": "alice"}'),
    ("/admin/keys", b'{"user": "a@example.com", "tags": ["tag:x"]}'), ("/admin/caps", b'{"https": "yes"}'),
    ("/admin/caps", b'{"funnel_ports": [0]}'), ("/admin/caps", b'{"funnel_ports": "1-99999"}'),
    ("/admin/caps", b'{"node": 99, "https": true}'), ("/admin/caps", b'{"node": "x", "https": true}'),
    ("/admin/caps", b'{"inherit": true}'), ("/admin/caps", b'{"inherit": "no", "node": 1}'),
    ("/admin/caps", b'{"bogus": true}'), ("/admin/caps", b'{"funnel_ports": {"443": 1}}'),
])
def test_bad_admin_arguments_are_refused_and_the_state_still_loads(tmp_path: Path, path: str,
                                                                  data: bytes) -> None:
    """The admin API is the one writer of keys besides nodes: nothing it accepts may make
    state.json unloadable (an infinite expiry used to be saved as `Infinity`)."""
    async def body(srv: ControlServer, stack: contextlib.AsyncExitStack) -> None:
        status, raw = await http1(admin_url(srv), "POST", path, data)
        assert status in (400, 404) and json.loads(raw)["error"], (status, raw)
        assert srv.admin("list_keys") == [] and srv.fault_status is None
        assert srv.tailnet.default_caps == NO_CAPS

    run(tmp_path, body)
    Tailnet(tmp_path / "control" / "state.json")  # loads: no StateError


# -- persistence -----------------------------------------------------------------------------


def test_state_survives_restart_without_secrets(tmp_path: Path) -> None:
    machine = noise.generate_private()
    saved: dict[str, Any] = {}

    async def first(srv: ControlServer, stack: contextlib.AsyncExitStack) -> None:
        key = srv.admin("create_key", reusable=True)
        j = await join(srv, stack, key["secret"], "keeper", machine)
        saved.update(secret=key["secret"], nk=j.nk, nodes=srv.admin("list_nodes"),
                     pub=await server_public_key(srv.url), port=srv.port)

    async def second(srv: ControlServer, stack: contextlib.AsyncExitStack) -> None:
        assert await server_public_key(srv.url) == saved["pub"]
        nodes = srv.admin("list_nodes")
        assert [(n["id"], n["hostname"], n["addresses"], n["node_key"]) for n in nodes] == \
            [(n["id"], n["hostname"], n["addresses"], n["node_key"]) for n in saved["nodes"]]
        # the node (same machine key) can poll again without registering
        c = await stack.enter_async_context(Ts2021Client(srv.url, machine))
        ms = await c.map_stream(map_body(saved["nk"], "keeper"))
        msg = await ms.next_message(5)
        assert ms.status == 200 and msg is not None
        assert [a.split("/")[0] for a in msg["Node"]["Addresses"]] == nodes[0]["addresses"]

    run(tmp_path, first)
    state = (tmp_path / "control" / "state.json").read_text()
    assert saved["secret"] not in state
    assert saved["secret"].split("-")[-1] not in state
    assert hashlib.sha256(saved["secret"].encode()).hexdigest() in state
    run(tmp_path, second)


# -- ephemeral nodes -------------------------------------------------------------------------


async def wait_event(srv: ControlServer, pred: Callable[[dict[str, Any]], bool],
                     timeout: float = 5) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            for ev in srv.admin("events"):
                if pred(ev):
                    return ev
            await asyncio.sleep(0.02)


def test_ephemeral_node_reaped_after_disconnect(tmp_path: Path) -> None:
    async def body(srv: ControlServer, stack: contextlib.AsyncExitStack) -> None:
        eph = srv.admin("create_key", reusable=True, ephemeral=True)["secret"]
        normal = srv.admin("create_key", reusable=True)["secret"]
        e = await join(srv, stack, eph, "eph")
        n = await join(srv, stack, normal, "durable")
        w = await join(srv, stack, normal, "watcher")
        eid, nid = node_id(srv, e.nk), node_id(srv, n.nk)
        assert {x["id"]: x["online"] for x in srv.admin("list_nodes")}[eid] is True

        await e.client.close()
        await n.client.close()
        await wait_event(srv, lambda ev: ev["kind"] == "node_reaped" and ev.get("node") == eid)
        await wait_event(srv, lambda ev: ev["kind"] == "map_ended" and ev.get("node") == nid)
        await w.stream.wait_for(lambda m: eid in m.get("PeersRemoved", []), 5)
        nodes = {x["id"]: x for x in srv.admin("list_nodes")}
        assert eid not in nodes
        assert nid in nodes and nodes[nid]["online"] is False and nodes[nid]["last_seen"]
        assert not [ev for ev in srv.admin("events")
                    if ev["kind"] == "node_reaped" and ev.get("node") == nid]

    run(tmp_path, body, ephemeral_reap_after=0.0)


def test_ephemeral_node_that_comes_back_in_time_is_kept(tmp_path: Path) -> None:
    async def body(srv: ControlServer, stack: contextlib.AsyncExitStack) -> None:
        eph = srv.admin("create_key", reusable=True, ephemeral=True)["secret"]
        machine = noise.generate_private()
        e = await join(srv, stack, eph, "eph", machine)
        eid = node_id(srv, e.nk)
        await e.client.close()
        await wait_event(srv, lambda ev: ev["kind"] == "map_ended" and ev.get("node") == eid)
        c = await stack.enter_async_context(Ts2021Client(srv.url, machine))
        ms = await c.map_stream(map_body(e.nk, "eph"))
        assert ms.status == 200
        await asyncio.sleep(0.8)  # an observation window: twice the reap delay passes
        assert eid in {x["id"] for x in srv.admin("list_nodes")}
        assert not [ev for ev in srv.admin("events") if ev["kind"] == "node_reaped"]

    run(tmp_path, body, ephemeral_reap_after=0.4)


def test_stop_does_not_reap_or_clobber_state_of_restarted_server(tmp_path: Path) -> None:
    async def main() -> None:
        data = tmp_path / "control"
        old = ControlServer(data, ephemeral_reap_after=0.3)
        await old.start()
        secret = old.admin("create_key", reusable=True, ephemeral=True)["secret"]
        async with contextlib.AsyncExitStack() as stack:
            e = await join(old, stack, secret, "eph")
            await old.stop()  # e's session is cut by the stop, not by the node
            new = ControlServer(data)
            await new.start()
            try:
                key = new.admin("create_key")
                await asyncio.sleep(0.8)  # observation window: the old reap delay passes
                assert [n["node_key"] for n in new.admin("list_nodes")] == [e.nk]
                state = json.loads((data / "state.json").read_text())
                assert key["id"] in [k["id"] for k in state["keys"]], "restarted server's key lost"
                assert [n["node_key"] for n in state["nodes"]] == [e.nk], "node reaped after stop"
            finally:
                await new.stop()

    asyncio.run(main())


def test_lite_map_request_gets_one_message_and_ends(tmp_path: Path) -> None:
    async def body(srv: ControlServer, stack: contextlib.AsyncExitStack) -> None:
        secret = srv.admin("create_key", reusable=True)["secret"]
        a = await join(srv, stack, secret, "alpha")
        b, nk_b = await register(srv, stack, secret, "beta")
        ms = await b.map_stream(map_body(nk_b, "beta", Stream=False, OmitPeers=True,
                                         Endpoints=["127.0.0.1:41641"]))
        msg = await ms.next_message(5)
        assert ms.status == 200 and msg is not None and msg["Node"]["Key"] == nk_b
        assert "Peers" not in msg
        assert await ms.next_message(5) is None  # the stream ended after one message
        # the endpoints it reported reach the peer with a live stream
        await a.stream.wait_for(lambda m: any(
            p["Key"] == nk_b and p["Endpoints"] == ["127.0.0.1:41641"]
            for p in m.get("PeersChanged", [])), 5)
        assert not srv.online(node_id(srv, nk_b))

    run(tmp_path, body)


# -- owners and capabilities on the wire ---------------------------------------------------------

FUNNEL_PORTS_443 = "https://tailscale.com/cap/funnel-ports?ports=443"


def test_every_peer_s_owner_has_a_user_profile_in_full_maps_and_deltas(tmp_path: Path) -> None:
    """tailscaled's WhoIs (serve's identity headers) finds a peer's user only in UserProfiles."""
    async def body(srv: ControlServer, stack: contextlib.AsyncExitStack) -> None:
        alice = srv.admin("create_key", user="alice@example.com")["secret"]
        tagged = srv.admin("create_key", tags=["tag:web"])["secret"]
        bob = srv.admin("create_key", user="bob@example.com")["secret"]
        a = await join(srv, stack, alice, "alice-laptop")
        t = await join(srv, stack, tagged, "web")

        def profiles(msg: dict[str, Any]) -> dict[int, str]:
            return {p["ID"]: p["LoginName"] for p in msg.get("UserProfiles", [])}

        me = a.first["Node"]
        assert profiles(a.first) == {me["User"]: "alice@example.com"}
        full = t.first  # the full map names the owners of the node and of every peer
        owners = {full["Node"]["User"]: "tagged-devices", full["Peers"][0]["User"]: "alice@example.com"}
        assert owners.items() <= profiles(full).items()
        assert full["Node"]["Tags"] == ["tag:web"] and full["Peers"][0]["Tags"] == []

        b = await join(srv, stack, bob, "bob-laptop")
        for j in (a, t):  # a delta brings the newcomer's profile with it
            delta = await j.stream.wait_for(peers_changed_with(b.nk), 5)
            peer = next(p for p in delta["PeersChanged"] if p["Key"] == b.nk)
            assert profiles(delta)[peer["User"]] == "bob@example.com"
        assert [p["DisplayName"] for p in b.first["UserProfiles"] if p["LoginName"] == "bob@example.com"] \
            == ["Bob"]

    run(tmp_path, body)


def test_granted_capabilities_reach_the_node_at_once_and_only_the_node(tmp_path: Path) -> None:
    async def body(srv: ControlServer, stack: contextlib.AsyncExitStack) -> None:
        secret = srv.admin("create_key", reusable=True)["secret"]
        a = await join(srv, stack, secret, "alpha")
        b = await join(srv, stack, secret, "beta")
        assert "CapMap" not in a.first["Node"] and a.first["DNSConfig"] == {}  # the default: none
        aid = node_id(srv, a.nk)

        out = srv.admin("set_caps", node=aid, https=True, funnel=True, funnel_ports=[443])
        assert out == {"node": aid, "caps": {"https": True, "funnel": True, "funnel_ports": "443"},
                       "pushed": [aid]}
        msg = await a.stream.wait_for(lambda m: "CapMap" in m.get("Node", {}), 5)
        assert msg["Node"]["CapMap"] == {"https": None, "funnel": None, FUNNEL_PORTS_443: None}
        assert msg["DNSConfig"] == {"CertDomains": ["alpha.tailnet.test"]}
        seen_by_b = await b.stream.wait_for(peers_changed_with(a.nk), 5)
        assert "CapMap" not in seen_by_b["PeersChanged"][0] and "DNSConfig" not in seen_by_b

        # a node that reconnects gets its grant in the first map, too
        again = await a.client.map_stream(map_body(a.nk, "alpha"))
        first = await again.next_message(5)
        assert first is not None and first["Node"]["CapMap"][FUNNEL_PORTS_443] is None
        assert first["DNSConfig"]["CertDomains"] == ["alpha.tailnet.test"]

        srv.admin("set_caps", node=aid, inherit=True)  # back to the default: all withdrawn
        msg = await a.stream.wait_for(lambda m: "Node" in m and "CapMap" not in m["Node"], 5)
        assert msg["DNSConfig"] == {}

        # the tailnet default reaches every node without a grant of its own
        srv.admin("set_caps", node=node_id(srv, b.nk))  # beta: explicitly nothing
        out = srv.admin("set_caps", https=True)
        assert out["node"] is None and out["pushed"] == [aid]
        msg = await a.stream.wait_for(lambda m: "Node" in m and "CapMap" in m["Node"], 5)
        assert msg["Node"]["CapMap"] == {"https": None}
        listed = {n["hostname"]: (n["caps"]["https"], n["caps_inherited"]) for n in srv.admin("list_nodes")}
        assert listed == {"alpha": (True, True), "beta": (False, False)}
        assert srv.admin("list_caps") == {
            "default": {"https": True, "funnel": False, "funnel_ports": ""},
            "nodes": {str(aid): {"https": True, "funnel": False, "funnel_ports": ""},
                      str(node_id(srv, b.nk)): {"https": False, "funnel": False, "funnel_ports": ""}}}

    run(tmp_path, body)


def test_admin_http_caps_and_key_owner(tmp_path: Path) -> None:
    async def body(srv: ControlServer, stack: contextlib.AsyncExitStack) -> None:
        async def admin(method: str, path: str, data: dict[str, Any] | None = None) -> tuple[int, Any]:
            status, raw = await http1(admin_url(srv), method, path,
                                      json.dumps(data).encode() if data else b"")
            return status, json.loads(raw)

        status, key = await admin("POST", "/admin/keys", {"user": "alice@example.com"})
        assert status == 200 and key["user"] == "alice@example.com"
        _, nk = await register(srv, stack, key["secret"], "laptop")
        nid = node_id(srv, nk)
        assert [n["user"] for n in (await admin("GET", "/admin/nodes"))[1]] == ["alice@example.com"]

        status, out = await admin("POST", "/admin/caps", {"node": nid, "https": True,
                                                          "funnel_ports": "443,8443"})
        assert status == 200 and out["caps"] == {"https": True, "funnel": False, "funnel_ports": "443,8443"}
        status, out = await admin("GET", "/admin/caps")
        assert status == 200 and out["nodes"][str(nid)]["funnel_ports"] == "443,8443"
        status, out = await admin("POST", "/admin/caps", {"node": nid, "inherit": True})
        assert status == 200 and out["caps"] == {"https": False, "funnel": False, "funnel_ports": ""}

    run(tmp_path, body)
