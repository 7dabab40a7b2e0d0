"""Two real tailscaled nodes against the embedded control: node B reaches node
A's `tailscale serve` ports through the embedded DERP relay (facts §7).

B runs with TS_DEBUG_ALWAYS_USE_DERP=1 (no UDP socket at all), so every
packet between A and B must cross our relay: if the relay is broken, the
fetches fail, not silently succeed over a direct path.
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from supervisor import tailscale as ts
from tests import harness
from tests.conftest import BODY
from tests.harness import Node, curl_via, echo_through, free_port, wait_for

pytestmark = pytest.mark.real

RELAY_ONLY_PREFIX = "relayonly"


@pytest.fixture
def relay_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nodes whose statedir name starts with RELAY_ONLY_PREFIX get no UDP
    socket (TS_DEBUG_ALWAYS_USE_DERP=1, in 1.78.1 and 1.96.4), so all their
    traffic goes through the DERP relay."""
    real = ts.tailscaled_command

    def command(bins, statedir: Path, **kw):
        argv, env = real(bins, statedir, **kw)
        if statedir.name.startswith(RELAY_ONLY_PREFIX):
            env["TS_DEBUG_ALWAYS_USE_DERP"] = "1"
        return argv, env

    monkeypatch.setattr(harness.ts, "tailscaled_command", command)


def serve_bg(node: Node, *args: str) -> str:
    out = subprocess.run([str(node.bins.tailscale), f"--socket={node.socket}", "serve", "--bg", *args],
                         capture_output=True, text=True, timeout=30, env=ts.cli_env())
    assert out.returncode == 0, f"tailscale serve {args} failed: {out.stderr}{out.stdout}"
    return out.stdout


def auth_key(control) -> str:
    return control.create_key(reusable=True)["secret"]


# -- the test --------------------------------------------------------------


def test_peer_reaches_serve_ports_through_derp(control, node_factory, relay_only, any_bins,
                                               local_http: int, local_echo: int) -> None:
    key = auth_key(control)

    a = node_factory("a", bins=any_bins)
    t_launch = a.started_at
    a.up(key, hostname="alpha")
    a_status = a.wait_state(ts.BackendState.RUNNING)
    launch_to_running = time.monotonic() - t_launch
    print(f"node A: launch → Running in {launch_to_running * 1000:.0f} ms")
    # With STUN answered, netcheck picks the home relay at once; without it
    # this takes ≈5 s (facts §3, §8).
    assert launch_to_running < 3.0, f"launch → Running took {launch_to_running:.2f}s"
    # Positive proof the relay is healthy: tailscaled logs this only on
    # FrameServerInfo, which is what clears `no-derp-connection`.
    a.stderr.wait(r"magicsock: derp-\d+ connected", timeout=10)

    serve_bg(a, "--http=80", f"http://127.0.0.1:{local_http}")
    serve_bg(a, "--tcp=2222", f"tcp://127.0.0.1:{local_echo}")

    socks = free_port()
    b = node_factory(RELAY_ONLY_PREFIX + "-b", bins=any_bins, socks5_port=socks)
    b.up(key, hostname="bravo")
    b.wait_state(ts.BackendState.RUNNING)
    b.stderr.wait(r"magicsock: derp-\d+ connected", timeout=15)

    a_fqdn = a_status.dns_name
    a_ip = next(ip for ip in a_status.tailscale_ips if "." in ip)
    assert a_fqdn.startswith("alpha."), a_fqdn
    wait_for(lambda: any(p.get("HostName") == "alpha" for p in b.status().peers), 10,
             "B to see A as a peer")

    # HTTP serve is matched by Host, so fetch by name (facts §7).
    body = wait_for(lambda: curl_via(socks, f"http://{a_fqdn}/"), 20,
                    f"B to fetch http://{a_fqdn}/ through the tailnet")
    assert body.encode() == BODY
    payload = b"ping through the relay " * 100
    assert wait_for(lambda: echo_through(socks, a_ip, 2222, payload), 10,
                    f"TCP echo via {a_ip}:2222") == payload

    # B has no UDP, so A sees B only via the relay; and neither node shows a
    # relay health warning.
    peer_b = next(p for p in a.status().peers if p.get("HostName") == "bravo")
    assert not peer_b.get("CurAddr"), f"unexpected direct path {peer_b.get('CurAddr')}"
    assert peer_b.get("Relay"), "A does not know B's home relay"
    for n in (a, b):
        health = n.status().health
        assert not [h for h in health if "relay server" in h], health
