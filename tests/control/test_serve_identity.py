"""`tailscale serve` identity headers end to end, real tailscaled against the embedded
control: the upstream behind a proxy sees the login of a user-owned peer, and nothing
for a tagged one (ipnlocal `addTailscaleIdentityHeaders`: WhoIs on the source address,
the peer's `User` looked up in the netmap's `UserProfiles`, skipped when the peer is
tagged). Headers a peer forges are dropped either way.

Peers join both before the proxy (their profiles reach it in its first, full map) and
after it (in a `PeersChanged` delta), since tailscaled learns profiles from both.
"""
from __future__ import annotations

import http.server
import subprocess
import threading
from collections.abc import Iterator

import pytest

from supervisor import tailscale as ts
from tests.control.test_peer_serve import serve_bg
from tests.harness import free_port, wait_for

pytestmark = pytest.mark.real

IDENTITY = ("Tailscale-User-Login", "Tailscale-User-Name", "Tailscale-User-Profile-Pic",
            "Tailscale-Headers-Info")
FORGED = {"Tailscale-User-Login": "mallory@evil.example", "Tailscale-User-Name": "Mallory"}


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers each GET with 200 and keeps its headers, keyed by the request path."""

    seen: dict[str, dict[str, str]]

    def do_GET(self) -> None:
        self.seen[self.path] = {k: v for k, v in self.headers.items()}
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[tuple[int, dict[str, dict[str, str]]]]:
    seen: dict[str, dict[str, str]] = {}
    handler = type("Recorder", (_Recorder,), {"seen": seen})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1], seen
    srv.shutdown()
    srv.server_close()


def fetch(socks: int, url: str, headers: dict[str, str]) -> bool:
    """GET through a node's SOCKS5 proxy; True on 200."""
    argv = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5",
            "--socks5-hostname", f"127.0.0.1:{socks}", url]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=15)
    return out.stdout == "200"


def test_upstream_sees_the_login_of_user_owned_peers_and_none_for_tagged(
        control, node_factory, any_bins, recorder) -> None:
    port, seen = recorder
    alice = control.admin("create_key", reusable=True, user="alice@example.com")["secret"]
    bob = control.admin("create_key", reusable=True, user="bob.smith@example.com")["secret"]
    tagged = control.admin("create_key", reusable=True, tags=["tag:ci"])["secret"]
    proxy_key = control.admin("create_key", tags=["tag:proxy"])["secret"]

    peers = {}
    socks = {}

    def join(name: str, key: str) -> None:
        socks[name] = free_port()
        peers[name] = node_factory(name, bins=any_bins, socks5_port=socks[name])
        peers[name].up(key, name)
        peers[name].wait_state(ts.BackendState.RUNNING)

    join("alice-early", alice)  # known before the proxy's first map
    proxy = node_factory("proxy", bins=any_bins)
    proxy.up(proxy_key, "proxy")
    fqdn = proxy.wait_state(ts.BackendState.RUNNING).dns_name
    serve_bg(proxy, "--http=80", f"http://127.0.0.1:{port}")
    join("bob-late", bob)  # the proxy hears of these in deltas
    join("tagged-late", tagged)

    for name in peers:
        wait_for(lambda: fetch(socks[name], f"http://{fqdn}/{name}", FORGED), 20,
                 f"{name} to fetch through the proxy")

    want = {"alice-early": ("alice@example.com", "Alice"), "bob-late": ("bob.smith@example.com", "Bob Smith")}
    for name, (login, display) in want.items():
        got = seen[f"/{name}"]
        assert got.get("Tailscale-User-Login") == login, (name, got)
        assert got.get("Tailscale-User-Name") == display, (name, got)
        assert got.get("Tailscale-User-Profile-Pic") == "", (name, got)
    assert not {h for h in IDENTITY if h in seen["/tagged-late"]}, seen["/tagged-late"]
