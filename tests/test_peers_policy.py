"""The embedded control's peers policy with real tailscaled under a real
`ts-supervisor run`: by default (`embedded_peers = "clients"`) the proxies see
client nodes but not each other, and a client still reaches every proxy; with
`"all"` (the setting, or `ts-supervisor control peers all` at run time) they
see each other. What a proxy sees is what its own LocalAPI status lists as peers."""
from __future__ import annotations

import asyncio

import pytest

from supervisor import tailscale as ts
from supervisor.control.cli import AdminClient
from tests.conftest import BODY
from tests.harness import curl_via, peer, wait_for

pytestmark = pytest.mark.real

PROXIES = ("pa", "pb")


def start_fleet(sup, local_http: int) -> AdminClient:
    for name in PROXIES:
        sup.write_proxy(name, login_server="embedded",
                        serve=[{"port": 80, "target": f"http://127.0.0.1:{local_http}"}])
    sup.start()
    for name in PROXIES:
        sup.wait_state(name, "running", 60)
    return AdminClient.from_data_dir(sup.data_dir / "control")


def peers_of(sup, name: str) -> set[str]:
    """The first DNS label of every peer in proxy `name`'s own LocalAPI status."""
    sock = sup.data_dir / "proxies" / name / "state" / ts.SOCKET_FILE
    raw = asyncio.run(ts.LocalAPI(sock).status_raw())
    return {str(p.get("DNSName", "")).split(".")[0] for p in (raw.get("Peer") or {}).values()}


def test_proxies_see_client_peers_not_each_other_and_a_client_reaches_every_proxy(
        sup, tmp_path, bins, local_http):
    admin = start_fleet(sup, local_http)
    assert admin.peers() == {"peers": "clients"}
    assert all(n["proxy"] for n in admin.nodes())  # the supervisor minted their keys
    with peer(bins, tmp_path / "client", admin.url, admin.create_key()["secret"], "client") as socks:
        for name in PROXIES:
            wait_for(lambda: curl_via(socks, f"http://{name}.tailnet.test/") == BODY.decode(), 30,
                     f"the client fetching through {name}")
        # the proxies joined before the client: a netmap holding the client would hold the
        # other proxy too, were it visible
        for name in PROXIES:
            wait_for(lambda: peers_of(sup, name) == {"client"}, 20, f"{name} seeing the client only")

        admin.set_peers("all")  # the policy off, at run time: each proxy now sees the other
        wait_for(lambda: peers_of(sup, "pa") == {"client", "pb"}, 20, "pa seeing pb")
        wait_for(lambda: peers_of(sup, "pb") == {"client", "pa"}, 20, "pb seeing pa")


def test_with_embedded_peers_all_proxies_see_each_other_until_the_policy_is_on(sup, local_http):
    sup.settings["embedded_peers"] = "all"
    admin = start_fleet(sup, local_http)
    assert admin.peers() == {"peers": "all"}
    wait_for(lambda: peers_of(sup, "pa") == {"pb"}, 20, "pa seeing pb")
    wait_for(lambda: peers_of(sup, "pb") == {"pa"}, 20, "pb seeing pa")

    admin.set_peers("clients")  # left with no peers at all: they must still lose each other
    for name in PROXIES:
        wait_for(lambda: peers_of(sup, name) == set(), 20, f"{name} no longer seeing the other proxy")
