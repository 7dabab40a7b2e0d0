"""The embedded control's persisted `state.json` (tailnet.Tailnet's loader).

Property: whatever the file holds - any bytes, JSON of any shape, a valid
state with one spot changed (wrong type, NaN, huge number, list for a dict,
missing or extra key, odd unicode) - loading either gives a tailnet the
control can serve from (maps render as strict JSON, times as RFC 3339, the
port binds, the Noise key works, a new node can join, a save reloads equal;
the v2 API's device and key objects render as strict JSON the API client
parses, stable node IDs are unique, an address set by hand is never handed
out), or raises one StateError: one line that names the file, the key and the reason.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import re

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from supervisor import tsapi
from supervisor.control import noise
from supervisor.control import tailnet as tn
from supervisor.control.api import _key as api_key_json
from supervisor.control.server import ControlServer
from tests.control.live_server import assert_node_json_decodes_in_go
from tests.control.strategies import JSON, dumps, mutated

T0 = 1_700_000_000.0
MKEY = "mkey:" + "ab" * 32


def _valid_state() -> dict:
    """A state as the control writes it: two keys, two nodes with everything filled in."""
    with tempfile.TemporaryDirectory() as d:
        net = tn.Tailnet(Path(d) / "state.json", now=lambda: T0)
        net.server_private = noise.generate_private().hex()
        net.port = 41641
        _, secret = net.create_key(reusable=True, tags=["tag:web"])
        net.create_key(ephemeral=True, expiry=None)
        net.create_oauth_client(["auth_keys", "devices:core"], ["tag:web"])
        net.create_api_token()
        net.set_tag_owners({"tag:db": ["tag:web", "alice@example.com"]})
        for host in ("web", "db"):
            r = net.register({"NodeKey": "nodekey:" + os.urandom(32).hex(), "Auth": {"AuthKey": secret},
                              "Hostinfo": {"Hostname": host, "OS": "linux",
                                           "Services": [{"Proto": "peerapi4", "Port": 1234}]}},
                             MKEY, "http://127.0.0.1:1")
            assert r.node is not None
            net.update_from_map(r.node, {"DiscoKey": "discokey:" + "cd" * 32,
                                         "Endpoints": ["127.0.0.1:41641"],
                                         "Hostinfo": {"Hostname": host, "NetInfo": {"PreferredDERP": 900}}})
            r.node.last_seen = T0
        net.api_set_ipv4(r.node, "100.64.0.77")  # the second node takes it, the first's is freed
        net.revoke_key(next(iter(net.keys)))
        net.save()
        return json.loads(net.path.read_text())


VALID = _valid_state()


@pytest.fixture(scope="module")
def state_dir():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def check_state(data_dir: Path, content: bytes) -> None:
    path = data_dir / "state.json"
    path.write_bytes(content)
    try:
        srv = ControlServer(data_dir)
    except tn.StateError as e:
        msg = str(e)
        assert msg.startswith(f"{path}: "), msg
        assert "\n" not in msg and len(msg) < 400, msg
        return
    net = srv.tailnet
    net.on_change = lambda kind, node: None  # no event loop here; peers are not the point
    now = T0
    for node in net.nodes.values():
        m = srv._full_map(node, with_peers=True)
        json.dumps(m, allow_nan=False)  # tailscaled's Go decoder takes strict JSON only
        for n in [m["Node"], *m.get("Peers", [])]:
            assert_node_json_decodes_in_go(n)
        assert net.by_node_key[node.node_key] is node
    json.dumps([srv.list_nodes(), srv.list_keys()], allow_nan=False)
    for node in net.nodes.values():  # the API's objects: strict JSON the client reads back
        device = srv.api._device(node)
        json.dumps(device, allow_nan=False)
        assert tsapi.parse_device(device).node_id == node.stable_id
        assert re.fullmatch(tn.STABLE_ID, node.stable_id)
    assert len({n.stable_id for n in net.nodes.values()}) == len(net.nodes)
    for key in net.keys.values():
        assert tsapi.parse_key(json.loads(json.dumps(api_key_json(key, now), allow_nan=False))).id == key.id
    assert 0 <= net.port <= 65535
    if net.server_private:
        noise.public_key(bytes.fromhex(net.server_private))
    try:
        _, secret = net.create_key(expiry=60)
        r = net.register({"NodeKey": "nodekey:" + os.urandom(32).hex(), "Auth": {"AuthKey": secret},
                          "Hostinfo": {"Hostname": "newcomer"}}, MKEY, "http://127.0.0.1:1")
        assert r.node is not None and r.node.id not in {n.id for n in net.nodes.values() if n is not r.node}
        assert r.node.ipv4 not in {n.ipv4 for n in net.nodes.values() if n is not r.node}
        assert r.node.ipv4 not in net.reserved_v4
        assert r.node.stable_id not in {n.stable_id for n in net.nodes.values() if n is not r.node}
    except tn.AdminError as e:
        assert "exhausted" in str(e)
    again = tn.Tailnet(path, now=lambda: now)
    assert again.nodes == net.nodes and again.keys == net.keys
    assert (again.oauth_clients, again.api_tokens, again.tag_owners, again.reserved_v4) == (
        net.oauth_clients, net.api_tokens, net.tag_owners, net.reserved_v4)


NESTED = b"[" * 100_000
STATE_SEEDS = [
    NESTED, b'{"port": 1e999}', b'{"port": 70000}', b'{"port": -1}', b'{"port": true}',
    b'{"server_private": "zz"}', b'{"server_private": 123}',
    b'{"next_node_id": -5}', b'{"next_node_id": 1e400}',
    b'{"keys": [[]]}', b'{"keys": {"a": 1}}', b'{"nodes": "x"}', b'[]', b'null', b'"text"',
    b'\xff\xfe', b'',
]


@pytest.mark.parametrize("content", STATE_SEEDS, ids=range(len(STATE_SEEDS)))
def test_seed_states_load_or_fail_in_one_line(state_dir: Path, content: bytes) -> None:
    check_state(state_dir, content)


def _node(**change: object) -> bytes:
    state = json.loads(json.dumps(VALID))
    state["nodes"][0].update(change)
    return dumps(state)


def _top(**change: object) -> bytes:
    state = json.loads(json.dumps(VALID))
    state.update(change)
    return dumps(state)


def _without_stable_ids() -> bytes:
    state = json.loads(json.dumps(VALID))
    for node in state["nodes"]:
        del node["stable_id"]
    return dumps(state)


def _client(**change: object) -> bytes:
    state = json.loads(json.dumps(VALID))
    state["oauth_clients"][0].update(change)
    return dumps(state)


def _key(**change: object) -> bytes:
    state = json.loads(json.dumps(VALID))
    state["keys"][0].update(change)
    return dumps(state)


ONE_WRONG_FIELD = {
    "node id a list": _node(id=[1]), "node id a string": _node(id="1"), "node id 0": _node(id=0),
    "node id 2^40": _node(id=2**40), "created NaN": _node(created=float("nan")),
    "key_expiry 1e300": _node(key_expiry=1e300), "last_seen Infinity": _node(last_seen=float("inf")),
    "created a word": _node(created="yesterday"), "tags a number": _node(tags=5),
    "a tag a number": _node(tags=["tag:x", 5]), "endpoints a string": _node(endpoints="1.2.3.4:5"),
    "hostinfo a list": _node(hostinfo=[]),
    "hostinfo fields of wrong types": _node(hostinfo={"OS": 5, "Hostname": ["x"], "Services": "all"}),
    "home_derp 2^80": _node(home_derp=2**80), "ipv4 not an address": _node(ipv4="not an address"),
    "ipv4 outside the tailnet": _node(ipv4="8.8.8.8"), "node_key null": _node(node_key=None),
    "machine_key a number": _node(machine_key=7), "disco_key an object": _node(disco_key={"k": 1}),
    "name with a newline": _node(name="Bad Name\n"), "ephemeral a string": _node(ephemeral="yes"),
    "unknown node field with a newline": _node(**{"bo\ngus": 1}), "key id a list": _key(id=["k"]),
    "uses -1": _key(uses=-1), "expires NaN": _key(expires=float("nan")), "reusable 1": _key(reusable=1),
    "secret_hash not a hash": _key(secret_hash="plaintext-secret"),
    "unknown key field with a newline": _key(**{"bo\ngus": 1}),
    "stable_id not hosted's form": _node(stable_id="node-1"), "stable_id a number": _node(stable_id=7),
    "stable_id empty (filled in)": _node(stable_id=""), "stable_id absent (filled in)": _without_stable_ids(),
    "description too long": _key(description="x" * 51), "revoked_at NaN": _key(revoked_at=float("nan")),
    "preauthorized a string": _key(preauthorized="yes"), "client scopes a string": _client(scopes="auth_keys"),
    "client scope with spaces": _client(scopes=["auth keys"]), "client tags bad": _client(tags=["web"]),
    "client secret_hash plain": _client(secret_hash="tskey-client-x"),
    "tag_owners a list": _top(tag_owners=["tag:a"]), "tag_owners bad owner": _top(tag_owners={"tag:a": ["x"]}),
    "tag_owners bad tag": _top(tag_owners={"web": ["tag:a"]}),
    "reserved_v4 outside": _top(reserved_v4=["8.8.8.8"]), "reserved_v4 a string": _top(reserved_v4="100.64.0.1"),
    "api_tokens an object": _top(api_tokens={"a": 1}), "oauth_clients [[]]": _top(oauth_clients=[[]]),
}


@pytest.mark.parametrize("content", list(ONE_WRONG_FIELD.values()), ids=list(ONE_WRONG_FIELD))
def test_one_wrong_field_loads_or_fails_in_one_line(state_dir: Path, content: bytes) -> None:
    check_state(state_dir, content)


def test_duplicates_and_stale_counters_are_one_error(state_dir: Path) -> None:
    state = json.loads(json.dumps(VALID))
    state["nodes"][1]["id"] = state["nodes"][0]["id"]
    check_state(state_dir, dumps(state))
    state = json.loads(json.dumps(VALID))
    state["nodes"][1]["node_key"] = state["nodes"][0]["node_key"]
    check_state(state_dir, dumps(state))
    state = json.loads(json.dumps(VALID))
    state["next_node_id"] = 1  # the next node would take node 1's id and address
    check_state(state_dir, dumps(state))
    state = json.loads(json.dumps(VALID))
    state["nodes"][1]["stable_id"] = state["nodes"][0]["stable_id"]
    check_state(state_dir, dumps(state))
    state = json.loads(json.dumps(VALID))
    state["reserved_v4"] = [f"100.64.0.{i}" for i in range(1, 255)]  # the allocator walks past them
    check_state(state_dir, dumps(state))


def test_the_control_reads_its_own_state(state_dir: Path) -> None:
    (state_dir / "state.json").write_bytes(dumps(VALID))
    srv = ControlServer(state_dir)
    assert len(srv.tailnet.nodes) == 2 and len(srv.tailnet.keys) == 2
    assert len(srv.tailnet.oauth_clients) == 1 and len(srv.tailnet.api_tokens) == 1
    assert srv.tailnet.reserved_v4 == {"100.64.0.77"}
    check_state(state_dir, dumps(VALID))


@given(st.one_of(st.binary(max_size=200), JSON.map(dumps), mutated(VALID).map(dumps)))
@example(NESTED)
def test_any_state_file_loads_or_fails_in_one_line(state_dir: Path, content: bytes) -> None:
    check_state(state_dir, content)
