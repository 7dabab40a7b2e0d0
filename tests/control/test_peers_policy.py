"""The peers policy on the wire: who hears about whom in map messages.

ControlServer in-process against the project's Python ts2021 client (no
tailscaled: tests/test_peers_policy.py runs the real binaries). A proxy here is
a node logged in with a key made with `proxy=True`, as the supervisor's minted
keys are. "Nothing was sent" is shown by order, never by waiting: a map stream
is ordered, so when the next change a node does see arrives, every message
before it is in hand and can be searched for the one it must not see."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from supervisor.control.server import ControlServer
from tests.control.test_server import Joined, join, node_id, peers_changed_with, run
from tests.control.ts2021_client import map_body, register_body


async def drain_until(j: Joined, pred: Any) -> list[dict[str, Any]]:
    """Every message on j's stream up to and including the first matching `pred`."""
    seen = []
    while True:
        msg = await j.stream.next_message(5)
        assert msg is not None, "map stream ended"
        seen.append(msg)
        if pred(msg):
            return seen


def mentions(messages: list[dict[str, Any]], nk: str, nid: int) -> bool:
    return any(p["Key"] == nk for m in messages for key in ("Peers", "PeersChanged") for p in m.get(key, [])) \
        or any(nid in m.get("PeersRemoved", []) for m in messages)


def test_proxies_see_clients_but_not_each_other_and_hear_nothing_of_each_other(tmp_path: Path) -> None:
    async def body(srv: ControlServer, stack: contextlib.AsyncExitStack) -> None:
        proxy_key = srv.admin("create_key", reusable=True, proxy=True)["secret"]
        client_key = srv.admin("create_key", reusable=True)["secret"]
        a = await join(srv, stack, proxy_key, "pa")
        b = await join(srv, stack, proxy_key, "pb")
        assert "Peers" not in b.first  # its only possible peer is another proxy
        c = await join(srv, stack, client_key, "client")
        assert {p["Key"] for p in c.first["Peers"]} == {a.nk, b.nk}  # a client sees every proxy
        before_c = await drain_until(a, peers_changed_with(c.nk))  # the proxies see the client
        await b.stream.wait_for(peers_changed_with(c.nk), 5)
        bid = node_id(srv, b.nk)
        assert not mentions(before_c, b.nk, bid)  # b's join and coming online reached a not at all

        # b leaves the tailnet: the client hears it, proxy a does not
        srv.admin("delete_node", id=bid)
        await c.stream.wait_for(lambda m: bid in m.get("PeersRemoved", []), 5)
        d = await join(srv, stack, client_key, "client2")
        assert {p["Key"] for p in d.first["Peers"]} == {a.nk, c.nk}
        before_d = await drain_until(a, peers_changed_with(d.nk))
        assert not mentions(before_d, b.nk, bid)

    run(tmp_path, body)


def test_changing_the_policy_tells_each_online_node_what_it_gained_and_lost(tmp_path: Path) -> None:
    async def body(srv: ControlServer, stack: contextlib.AsyncExitStack) -> None:
        proxy_key = srv.admin("create_key", reusable=True, proxy=True)["secret"]
        client_key = srv.admin("create_key", reusable=True)["secret"]
        a = await join(srv, stack, proxy_key, "pa")
        b = await join(srv, stack, proxy_key, "pb")
        c = await join(srv, stack, client_key, "client")
        await a.stream.wait_for(peers_changed_with(c.nk), 5)
        await b.stream.wait_for(peers_changed_with(c.nk), 5)
        aid, bid = node_id(srv, a.nk), node_id(srv, b.nk)

        assert srv.admin("peers") == {"peers": "clients"}
        out = srv.admin("set_peers", peers="all")
        assert out["peers"] == "all" and sorted(out["pushed"]) == sorted([aid, bid])  # not the client
        gained = await a.stream.wait_for(peers_changed_with(b.nk), 5)
        assert [p["Key"] for p in gained["PeersChanged"]] == [b.nk]
        await b.stream.wait_for(peers_changed_with(a.nk), 5)
        late = await join(srv, stack, proxy_key, "pc")  # under `all` a new proxy's first map has them all
        assert {p["Key"] for p in late.first["Peers"]} == {a.nk, b.nk, c.nk}

        assert srv.admin("set_peers", peers="all")["pushed"] == []  # no change, nothing sent
        srv.admin("set_peers", peers="clients")
        lost = await a.stream.wait_for(lambda m: bid in m.get("PeersRemoved", []), 5)
        assert "PeersChanged" not in lost
        await late.stream.wait_for(lambda m: {aid, bid} <= set(m.get("PeersRemoved", [])), 5)
        # a map request opened now gets the client only
        ms = await a.client.map_stream(map_body(a.nk, "pa", Stream=False))
        full = await ms.next_message(5)
        assert full is not None and [p["Key"] for p in full["Peers"]] == [c.nk]

    run(tmp_path, body)


def test_a_node_that_logs_in_again_as_a_proxy_leaves_the_other_proxies_netmaps(tmp_path: Path) -> None:
    async def body(srv: ControlServer, stack: contextlib.AsyncExitStack) -> None:
        proxy_key = srv.admin("create_key", reusable=True, proxy=True)["secret"]
        client_key = srv.admin("create_key", reusable=True)["secret"]
        a = await join(srv, stack, proxy_key, "pa")
        c = await join(srv, stack, client_key, "was-client")
        await a.stream.wait_for(peers_changed_with(c.nk), 5)
        cid = node_id(srv, c.nk)
        # the same node key logs in again with a proxy's key (a supervisor adopting it)
        status, raw = await c.client.post("/machine/register", register_body(c.nk, proxy_key, "was-client"))
        assert status == 200, raw
        await a.stream.wait_for(lambda m: cid in m.get("PeersRemoved", []), 5)
        await c.stream.wait_for(lambda m: node_id(srv, a.nk) in m.get("PeersRemoved", []), 5)
        assert [n["proxy"] for n in srv.admin("list_nodes")] == [True, True]

    run(tmp_path, body)
