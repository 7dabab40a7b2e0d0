"""The serve config as one unit of a proxy's life: a stop leaves none behind,
a wipe keeps the certificates, a changed [[serve]] set is applied in place."""
from __future__ import annotations

import asyncio
import json

import pytest

from supervisor import tailscale as ts
from tests.control.test_serve_identity import recorder  # noqa: F401  (fixture)
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


def test_three_services_on_one_proxy_each_reached_by_a_peer(sup, tmp_path, any_bins, local_http, local_echo):
    """http on 80, a /api mount on 80 and tcp on 22, under one tailnet name."""
    bins = any_bins
    sup.settings.update(tailscale=str(bins.tailscale), tailscaled=str(bins.tailscaled))
    import http.server
    import threading
    from supervisor.control.cli import AdminClient
    from tests.harness import curl_via, echo_through, peer, wait_for

    class Api(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = f"api saw {self.path}\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a) -> None:
            pass
    api = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=api.serve_forever, daemon=True).start()
    try:
        (sup.config_dir).mkdir(parents=True, exist_ok=True)
        (sup.config_dir / "nas.toml").write_text(f"""login_server = "embedded"
[[serve]]
port = 80
target = "http://127.0.0.1:{local_http}"
[[serve]]
port = 80
path = "/api"
target = "http://127.0.0.1:{api.server_address[1]}"
[[serve]]
port = 22
mode = "tcp"
target = "tcp://127.0.0.1:{local_echo}"
""")
        sup.start()
        sup.wait_state("nas", "running", 30)
        ip4 = next(ip for ip in sup.status()["nas"]["tailscale_ips"] if "." in ip)
        admin = AdminClient.from_data_dir(sup.data_dir / "control")
        with peer(bins, tmp_path / "peer", admin.url, admin.create_key()["secret"]) as socks:
            from tests.conftest import BODY
            wait_for(lambda: curl_via(socks, "http://nas.tailnet.test/") == BODY.decode(), 20, "/ on 80")
            assert curl_via(socks, "http://nas.tailnet.test/api/users") == "api saw /users\n"
            payload = b"over tcp 22 " * 20
            assert wait_for(lambda: echo_through(socks, ip4, 22, payload), 10, "tcp 22") == payload
    finally:
        api.shutdown()
        api.server_close()


def test_a_changed_service_set_is_applied_by_reload_with_the_same_tailscaled(sup, control, tmp_path, any_bins):
    from tests.test_supervisor import key_file
    sup.settings.update(tailscale=str(any_bins.tailscale), tailscaled=str(any_bins.tailscaled))
    path, _ = key_file(tmp_path, control, "k", reusable=True)
    sup.write_proxy("app", hostname="app", login_server=control.url, auth_key_file=str(path),
                    serve=[{"port": 80, "target": "http://127.0.0.1:8080"}])
    sup.start()
    sup.wait_state("app", "running", 30)
    before = sup.status()["app"]
    node = control.node_named("app")["id"]
    n = len(sup.events())
    sup.write_proxy("app", hostname="app", login_server=control.url, auth_key_file=str(path),
                    serve=[{"port": 80, "target": "http://127.0.0.1:8080"},
                           {"port": 8443, "mode": "http", "target": "http://127.0.0.1:9000"},
                           {"port": 2222, "target": "tcp://127.0.0.1:22"}])
    sup.wait_event(lambda e: e["proxy"] == "app" and e["event"] == "serve_applied", 30, "in place", after=n)
    sock = sup.data_dir / "proxies" / "app" / "state" / "tailscaled.sock"
    raw = asyncio.run(ts.LocalAPI(sock).request("GET", "/localapi/v0/serve-config"))
    assert {(s.port, s.mode) for s in ts.serve_services(json.loads(raw))} == {(80, "http"), (8443, "http"),
                                                                               (2222, "tcp")}
    after = sup.status()["app"]
    assert (after["pid"], after["state"]) == (before["pid"], "running")
    assert control.node_named("app")["id"] == node
    assert not [e for e in sup.events()[n:] if e["proxy"] == "app" and e["state"]]


def test_funnel_preflight_names_each_missing_prerequisite_and_never_restarts(sup, control, tmp_path, any_bins):
    """As tailscale checks it (ipn.NodeCanFunnel, CheckFunnelPort): HTTPS with
    cert domains, the funnel attribute, an allowed port. Each missing one is
    its own reason; the rest is served; tailscaled is never restarted. The
    embedded control cannot issue certificates or run Funnel ingress, so this
    proves the pre-flight and the serve config, not Internet traffic."""
    from tests.harness import wait_for
    from tests.test_supervisor import key_file
    sup.settings.update(tailscale=str(any_bins.tailscale), tailscaled=str(any_bins.tailscaled),
                        reconcile_period=0.5)
    path, _ = key_file(tmp_path, control, "k", reusable=True)
    sup.write_proxy("app", hostname="app", login_server=control.url, auth_key_file=str(path),
                    serve=[{"port": 80, "target": "http://127.0.0.1:8080"},
                           {"port": 443, "mode": "https", "target": "http://127.0.0.1:8080", "funnel": True}])
    sup.start()

    def reason_has(words: str) -> dict:
        return wait_for(lambda: (s := sup.status()["app"])["state"] == "degraded" and words in s["reason"]
                        and s, 30, words)
    st = reason_has("HTTPS certificates are not enabled on this tailnet")
    pid = st["pid"]
    sock = sup.data_dir / "proxies" / "app" / "state" / "tailscaled.sock"
    raw = asyncio.run(ts.LocalAPI(sock).request("GET", "/localapi/v0/serve-config"))
    assert {s.port for s in ts.serve_services(json.loads(raw))} == {80}  # the rest is served
    control.admin("set_caps", https=True)
    reason_has('Funnel not available; "funnel" node attribute not set')
    control.admin("set_caps", https=True, funnel=True, funnel_ports=[8443])
    reason_has("port 443 is not allowed for funnel; allowed ports are: 8443")
    control.admin("set_caps", https=True, funnel=True, funnel_ports=[443, 8443, 10000])
    wait_for(lambda: sup.status()["app"]["state"] == "running", 30, "running with funnel")
    raw = asyncio.run(ts.LocalAPI(sock).request("GET", "/localapi/v0/serve-config"))
    assert {(s.port, s.mode, s.funnel) for s in ts.serve_services(json.loads(raw))} == {
        (80, "http", False), (443, "https", True)}
    st = sup.status()["app"]
    assert (st["pid"], st["restarts"], st["recoveries"]) == (pid, 0, 0)


def test_identity_headers_reach_the_upstream_behind_a_supervised_proxy(sup, control, tmp_path, recorder,
                                                                        node_factory):
    """A user-owned peer's login reaches the upstream; a tagged peer's request
    carries no identity; headers a peer forges are dropped either way."""
    from tests.control.test_serve_identity import FORGED, IDENTITY, fetch
    from tests.harness import free_port, wait_for
    port, seen = recorder
    proxy_key = control.admin("create_key", reusable=True, tags=["tag:proxy"])["secret"]
    keyfile = tmp_path / "proxy.secret"
    keyfile.write_text(proxy_key + "\n")
    sup.write_proxy("app", hostname="app", login_server=control.url, auth_key_file=str(keyfile),
                    tags=["tag:proxy"], serve=[{"port": 80, "target": f"http://127.0.0.1:{port}"}])
    sup.start()
    sup.wait_state("app", "running", 30)
    socks = {}
    for name, key in (("alice", control.admin("create_key", user="alice@example.com")["secret"]),
                      ("robot", control.admin("create_key", tags=["tag:ci"])["secret"])):
        socks[name] = free_port()
        node_factory(name, socks5_port=socks[name]).up(key, name)
    for name in socks:
        wait_for(lambda: fetch(socks[name], f"http://app.tailnet.test/{name}", FORGED), 20, f"{name} fetches")
    assert seen["/alice"].get("Tailscale-User-Login") == "alice@example.com"
    assert not {h for h in IDENTITY if h in seen["/robot"]}
    assert sup.status()["app"]["state"] == "running"


def test_a_unix_socket_upstream_serves_on_1_96(sup, tmp_path, bins):
    """`unix:/PATH` (tailscale 1.94 and later): the upstream listens on a
    socket no other local user can reach, so identity headers can be trusted."""
    import os
    import socketserver
    import tempfile
    import threading
    from supervisor.control.cli import AdminClient
    from tests.conftest import BODY, _Handler
    from tests.harness import curl_via, peer, wait_for

    class UnixHTTP(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

    class Handler(_Handler):
        def address_string(self) -> str:  # a unix peer has no (host, port)
            return "unix"
    d = tempfile.mkdtemp(prefix="ts-unix-", dir="/tmp")
    path = os.path.join(d, "app.sock")
    srv = UnixHTTP(path, Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        sup.write_proxy("app", login_server="embedded", serve=[{"port": 80, "target": f"unix:{path}"}])
        sup.start()
        sup.wait_state("app", "running", 30)
        admin = AdminClient.from_data_dir(sup.data_dir / "control")
        with peer(bins, tmp_path / "peer", admin.url, admin.create_key()["secret"]) as socks:
            wait_for(lambda: curl_via(socks, "http://app.tailnet.test/") == BODY.decode(), 20,
                     "a peer to fetch through the unix upstream")
    finally:
        srv.shutdown()
        srv.server_close()
        os.unlink(path)
        os.rmdir(d)
