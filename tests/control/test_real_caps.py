"""Capabilities granted by the embedded control, as real tailscaled shows them: the
`https` capability with `CertDomains`, the `funnel` attribute and `funnel-ports`, in
`/localapi/v0/status` (Self.CapMap, and the deprecated Self.Capabilities list, on both
1.96.4 and 1.78.1) and read back by the supervisor's own `LocalAPI.observe`. A grant
reaches a running node at once, with no restart and no new login.

tailscale's own Funnel pre-flight (`ipn.CheckFunnelAccess`, run by `tailscale funnel`)
reads what the control sends here, which proves the encoding of `funnel-ports`. Note
that its CLI checks port 443 whatever port is asked for (funnel.go `verifyFunnelEnabled`).
The control issues no certificates and runs no Funnel ingress: nothing here is reachable
from outside, and an https handler has no certificate to present.
"""
from __future__ import annotations

import subprocess
import time

import pytest

from supervisor import tailscale as ts
from tests.harness import Node, wait_for

pytestmark = pytest.mark.real

HTTPS, FUNNEL = "https", "funnel"
FUNNEL_PORTS = "https://tailscale.com/cap/funnel-ports?ports="


def observe(node: Node) -> ts.Observed:
    return node.call(node.api.observe())


def granted(node: Node, want: set[str], cert_domains: tuple[str, ...], what: str) -> float:
    """Wait until the node shows exactly these capabilities and CertDomains; seconds taken."""
    t0 = time.monotonic()

    def shows() -> bool:
        ob = observe(node)
        caps = {c for c in ob.capabilities if not c.startswith("HTTPS://TAILSCALE.COM/s/DEPRECATED")}
        return caps == want and ob.cert_domains == cert_domains
    wait_for(shows, 5, what)
    return time.monotonic() - t0


def funnel_cli(node: Node, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(node.bins.tailscale), f"--socket={node.socket}", "funnel", "--bg", *args],
                          capture_output=True, text=True, timeout=30, env=ts.cli_env())


def test_grants_show_in_status_at_once_and_tailscale_reads_them(node_factory, control, any_bins) -> None:
    node = node_factory("a", bins=any_bins)
    node.up(control.create_key()["secret"], "alpha")
    st = node.wait_state(ts.BackendState.RUNNING)
    pid = node.proc.pid
    nid = control.node_named("alpha")["id"]
    fqdn = (st.dns_name,)
    raw = node.status_raw()
    assert not raw.get("CertDomains") and not raw["Self"].get("CapMap")  # the default: nothing

    control.admin("set_caps", node=nid, https=True)
    took = granted(node, {HTTPS}, fqdn, "https and CertDomains")
    assert took < 2, f"the grant took {took:.2f}s to show"
    raw = node.status_raw()
    assert raw["CertDomains"] == ["alpha.tailnet.test"]
    assert raw["Self"]["CapMap"] == {"https": None}
    assert "https" in raw["Self"]["Capabilities"]  # the deprecated list still carries it

    control.admin("set_caps", node=nid, https=True, funnel=True)
    granted(node, {HTTPS, FUNNEL}, fqdn, "the funnel attribute")
    out = funnel_cli(node, "--https=443", "http://127.0.0.1:9")
    assert out.returncode == 1 and out.stderr.strip() == "port 443 is not allowed for funnel", out

    control.admin("set_caps", node=nid, https=True, funnel=True, funnel_ports=[8443, "10000-10010"])
    granted(node, {HTTPS, FUNNEL, FUNNEL_PORTS + "8443,10000-10010"}, fqdn, "funnel-ports")
    out = funnel_cli(node, "--https=443", "http://127.0.0.1:9")
    assert out.returncode == 1, out
    assert out.stderr.strip() == "port 443 is not allowed for funnel; allowed ports are: 8443,10000-10010"

    control.admin("set_caps", node=nid, https=True, funnel=True, funnel_ports=[443])
    granted(node, {HTTPS, FUNNEL, FUNNEL_PORTS + "443"}, fqdn, "funnel-ports 443")
    out = funnel_cli(node, "--https=443", "http://127.0.0.1:9")
    assert out.returncode == 0 and "Funnel started" in out.stdout, out

    control.admin("set_caps", node=nid, inherit=True)  # back to the tailnet default: nothing
    granted(node, set(), (), "every grant withdrawn")
    assert not node.status_raw().get("CertDomains")
    assert node.proc.pid == pid and node.status().backend_state == ts.BackendState.RUNNING


def test_tailnet_default_reaches_running_and_new_nodes_but_not_a_node_with_its_own(
        node_factory, control) -> None:
    key = control.create_key(reusable=True)["secret"]
    a, b = node_factory("a"), node_factory("b")
    a.up(key, "alpha")
    b.up(key, "beta")
    a.wait_state(ts.BackendState.RUNNING)
    b.wait_state(ts.BackendState.RUNNING)
    control.admin("set_caps", node=control.node_named("beta")["id"])  # beta: explicitly nothing

    control.admin("set_caps", https=True, funnel=True, funnel_ports="443,8443")
    want = {HTTPS, FUNNEL, FUNNEL_PORTS + "443,8443"}
    granted(a, want, ("alpha.tailnet.test",), "the default on a running node")
    late = node_factory("c")
    late.up(key, "gamma")
    late.wait_state(ts.BackendState.RUNNING)
    granted(late, want, ("gamma.tailnet.test",), "the default on a new node")
    granted(b, set(), (), "beta keeps its own (empty) grant")
    # a peer's grant is its own business: no CapMap on the peer entries
    assert all(not p.get("CapMap") for p in late.status_raw()["Peer"].values())
