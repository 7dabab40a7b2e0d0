"""The serve config as one unit of a proxy's life: a stop leaves none behind,
a wipe keeps the certificates, a changed [[serve]] set is applied in place."""
from __future__ import annotations

import asyncio
import json

import pytest

from supervisor import tailscale as ts
from tests.harness import Node
from tests.test_supervisor import run_proxy

pytestmark = pytest.mark.real


def test_a_stopped_proxy_leaves_no_serve_config_behind(sup, control, tmp_path, any_bins):
    sup.settings.update(tailscale=str(any_bins.tailscale), tailscaled=str(any_bins.tailscaled))
    run_proxy(sup, control, tmp_path, "app", reusable=True)
    out = sup.cli("stop", "app", "--data-dir", str(sup.data_dir))
    assert out.returncode == 0, out.stderr
    sup.wait_state("app", "stopped", 20)
    assert sup.status()["app"]["pid"] is None
    # tailscaled keeps a --bg serve config in its state: start the state dir bare and look
    statedir = sup.data_dir / "proxies" / "app" / "state"
    node = Node(bins=any_bins, statedir=statedir, control_url=control.url).start()
    try:
        raw = asyncio.run(ts.LocalAPI(node.socket).request("GET", "/localapi/v0/serve-config"))
        assert ts.serve_services(json.loads(raw or b"{}")) == frozenset()
    finally:
        node.kill()


def test_a_wipe_keeps_the_certificates(sup, control, tmp_path):
    """Only a planted file can stand for a certificate here (the embedded
    control issues none); the point is that a recovery does not delete it,
    so two recoveries in a week do not hit Let's Encrypt's duplicate limit."""
    run_proxy(sup, control, tmp_path, "app", reusable=True)
    certs = sup.data_dir / "proxies" / "app" / "state" / "certs"
    certs.mkdir(exist_ok=True)
    (certs / "app.tailnet.test.crt").write_text("planted certificate\n")
    n = len(sup.events())
    control.admin("delete_node", id=control.node_named("app")["id"])
    sup.wait_state("app", "recovering", 10, after=n)
    sup.wait_state("app", "running", 30, after=n)
    assert [e["event"] for e in sup.events()[n:] if e["proxy"] == "app"].count("wiped") == 1
    assert (certs / "app.tailnet.test.crt").read_text() == "planted certificate\n"
