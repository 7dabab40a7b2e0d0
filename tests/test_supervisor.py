"""`ts-supervisor run` as a user runs it: real tailscaled and `tailscale serve`
children against the project's control, observed through events.jsonl,
`status --json` and the control's own decision log."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from supervisor.control.cli import AdminClient
from tests.conftest import BODY
from tests.harness import Node, curl_via, echo_through, free_port, wait_for
from tests.supervisor_harness import SupervisorProc

pytestmark = pytest.mark.real


def key_file(tmp_path: Path, control, name: str = "key", **kw: Any) -> tuple[Path, dict[str, Any]]:
    key = control.create_key(**kw)
    path = tmp_path / f"{name}.secret"
    path.write_text(key["secret"] + "\n")
    return path, key


def proxy_on(sup: SupervisorProc, control, name: str, keyfile: Path, port: int = 8080, **kw: Any) -> None:
    sup.write_proxy(name, hostname=name, target=f"http://127.0.0.1:{port}", serve="http", port=80,
                    login_server=control.url, auth_key_file=str(keyfile), **kw)


def run_proxy(sup: SupervisorProc, control, tmp_path: Path, name: str,
              proxy: dict[str, Any] | None = None, **key_kw: Any) -> dict[str, Any]:
    """One proxy on the test control with its own key file, supervisor started,
    proxy running. Returns the key (id and secret)."""
    path, key = key_file(tmp_path, control, name, **key_kw)
    proxy_on(sup, control, name, path, **(proxy or {}))
    sup.start()
    sup.wait_state(name, "running")
    return key


def registrations(control, hostname: str, since: float = 0.0) -> list[dict[str, Any]]:
    return [e for e in control.events(since)
            if e["kind"] == "register_ok" and e.get("hostname") == hostname]


def test_proxies_run_and_a_peer_fetches_their_targets(sup, tmp_path, local_http, local_echo, bins):
    """End to end on the embedded control (the shipped default): a peer node
    reaches both proxies' targets through the tailnet."""
    sup.write_proxy("web", hostname="web", target=f"http://127.0.0.1:{local_http}", serve="http",
                    port=80, login_server="embedded")
    sup.write_proxy("shell", hostname="shell", target=f"tcp://127.0.0.1:{local_echo}", serve="tcp",
                    port=2222, login_server="embedded")
    sup.start()
    sup.wait_state("web", "running")
    sup.wait_state("shell", "running")

    status = sup.status()
    assert {status[n]["state"] for n in ("web", "shell")} == {"running"}
    shell_ip = next(ip for ip in status["shell"]["tailscale_ips"] if "." in ip)
    assert status["web"]["dns_name"] == "web.tailnet.test"

    admin = AdminClient.from_data_dir(sup.data_dir / "control")
    socks = free_port()
    peer = Node(bins=bins, statedir=tmp_path / "peer",
                control_url=admin.url, socks5_port=socks)
    try:
        peer.start()
        peer.up(admin.create_key()["secret"], "peer")
        wait_for(lambda: curl_via(socks, "http://web.tailnet.test/") == BODY.decode(), 20,
                 "peer to fetch the web proxy's target")
        payload = b"through the shell proxy " * 50
        assert wait_for(lambda: echo_through(socks, shell_ip, 2222, payload), 10,
                        "TCP through the shell proxy") == payload
    finally:
        peer.kill()


def test_deleted_node_recovers_exactly_once(sup, control, tmp_path, any_bins):
    """Also with the older release a NAS package may ship, named in settings."""
    sup.settings.update(tailscale=str(any_bins.tailscale), tailscaled=str(any_bins.tailscaled))
    run_proxy(sup, control, tmp_path, "app", reusable=True)
    assert psutil.Process(sup.status()["app"]["pid"]).exe() == str(any_bins.tailscaled)
    old = control.node_named("app")
    t0 = time.monotonic()
    control.admin("delete_node", id=old["id"])

    n = len(sup.events())
    sup.wait_state("app", "recovering", 10, after=n)
    ev = sup.wait_state("app", "running", 30, after=n)
    assert "node not found" in sup.status()["app"]["last_error"]
    assert sup.status()["app"]["recoveries"] == 1
    assert len(registrations(control, "app", since=t0)) == 1
    assert control.node_named("app")["id"] != old["id"]
    assert ev["detail"]["ips"]


def test_ephemeral_node_reaped_after_kill9_of_tailscaled_recovers_once(sup, control, tmp_path):
    run_proxy(sup, control, tmp_path, "eph", reusable=True, ephemeral=True, proxy={"ephemeral": True})
    nid = control.node_named("eph")["id"]
    pid = sup.status()["eph"]["pid"]
    n = len(sup.events())
    os.kill(pid, signal.SIGKILL)  # a hard crash: the control reaps the node
    control.wait_event(lambda e: e["kind"] == "node_reaped" and e["node"] == nid, 10, "reap")
    sup.wait_state("eph", "recovering", 20, after=n)
    sup.wait_state("eph", "running", 30, after=n)
    st = sup.status()["eph"]
    assert st["recoveries"] == 1 and st["restarts"] == 1
    assert st["pid"] != pid


def test_supervisor_kill9_while_node_deleted_recovers_once_on_restart(sup, control, tmp_path):
    run_proxy(sup, control, tmp_path, "app", reusable=True)
    tailscaled = psutil.Process(sup.status()["app"]["pid"])
    sup.kill9()
    tailscaled.wait(10)  # the parent-death pipe takes the children down with it
    control.admin("delete_node", id=control.node_named("app")["id"])

    n = len(sup.events())
    sup.start()
    sup.wait_state("app", "running", 30, after=n)
    kinds = [(e["event"], e["state"]) for e in sup.events()[n:] if e["proxy"] == "app"]
    assert kinds.count(("recovering", "recovering")) == 1, kinds
    assert sup.status()["app"]["recoveries"] == 1


def test_revoked_key_and_deleted_node_relaunch_once_then_failed(sup, control, tmp_path):
    key = run_proxy(sup, control, tmp_path, "doomed", reusable=True)
    control.admin("revoke_key", id=key["id"])
    control.admin("delete_node", id=control.node_named("doomed")["id"])
    failed = sup.wait_state("doomed", "failed", 30)
    assert "invalid key" in failed["reason"]
    st = sup.status()["doomed"]
    assert st["state"] == "failed" and st["recoveries"] == 1 and st["pid"] is None
    assert "invalid key" in st["last_error"]
    assert not [p for p in sup.children() if "tailscale" in p.name()]

    # Absence over a window: nothing registers from this proxy after `failed`.
    t_failed = time.monotonic()
    time.sleep(5)
    late = [e for e in control.events(t_failed) if e["kind"].startswith("register")]
    assert late == []


def test_secrets_never_leave_the_key_file(sup, control, tmp_path):
    key = run_proxy(sup, control, tmp_path, "quiet")
    secret = key["secret"]
    out = sup.cli("status", "--data-dir", str(sup.data_dir), "--json")
    assert out.returncode == 0 and secret not in out.stdout
    for f in sup.data_dir.rglob("*"):
        if f.is_file() and f.suffix != ".sock" and not f.name.startswith("tailscaled.state"):
            assert secret.encode() not in f.read_bytes(), f
    assert secret not in sup.text()
    for p in [sup.proc and psutil.Process(sup.proc.pid), *sup.children()]:
        assert p and secret not in " ".join(p.cmdline())


def test_restarted_supervisor_keeps_embedded_nodes_without_new_logins(sup):
    """The embedded control keeps its key, nodes and port, so a warm restart
    (a NAS reboot) brings the same nodes back: same addresses, no wipe."""
    sup.write_proxy("web", hostname="web", target="http://127.0.0.1:9", serve="http", port=80,
                    login_server="embedded")
    sup.start()
    sup.wait_state("web", "running")
    before = sup.status()["web"]
    assert sup.stop() == 0

    n = len(sup.events())
    sup.start()
    sup.wait_state("web", "running", after=n)
    after = sup.status()["web"]
    assert after["tailscale_ips"] == before["tailscale_ips"]
    assert after["recoveries"] == 0
    nodes = AdminClient.from_data_dir(sup.data_dir / "control").nodes()
    assert [x["hostname"] for x in nodes] == ["web"]


@pytest.mark.parametrize("version,content", [("1.96.4", b""), ("1.96.4", b'{"_machinekey'),
                                             ("1.78.1", b'{"_machinekey')],
                         ids=["ts1.96.4-zero-byte", "ts1.96.4-truncated", "ts1.78.1-truncated"])
def test_corrupt_state_file_is_wiped_once(sup, control, tmp_path, version, content):
    """A power loss leaves tailscaled.state empty or cut short (tailscale#20515)."""
    from supervisor import tailscale as ts
    bins = ts.Binaries.locate(version=version)
    sup.settings.update(tailscale=str(bins.tailscale), tailscaled=str(bins.tailscaled))
    run_proxy(sup, control, tmp_path, "app", reusable=True)
    assert sup.stop() == 0
    state = sup.data_dir / "proxies" / "app" / "state" / "tailscaled.state"
    state.write_bytes(content)

    n = len(sup.events())
    sup.start()
    rec = sup.wait_state("app", "recovering", 30, after=n)
    assert "state" in rec["reason"].lower()
    sup.wait_state("app", "running", 30, after=n)
    assert sup.status()["app"]["recoveries"] == 1


def test_expired_node_key_reauthenticates_in_place(sup, control, tmp_path):
    run_proxy(sup, control, tmp_path, "aging", reusable=True)
    before = sup.status()["aging"]
    node = control.node_named("aging")
    n = len(sup.events())
    control.admin("expire_node", id=node["id"])
    ev = sup.wait_state("aging", "recovering", 10, after=n)
    assert ev["event"] == "reauthenticating"
    sup.wait_state("aging", "running", 30, after=n)
    after = sup.status()["aging"]
    assert after["tailscale_ips"] == before["tailscale_ips"]  # same node, same address
    assert control.node_named("aging")["id"] == node["id"] and not control.node_named("aging")["expired"]
    assert not [e for e in sup.events()[n:] if e["event"] == "wiped"]


def test_register_rejected_by_http_401_relaunches_once_then_failed(sup, control, tmp_path):
    """facts §4f: no ErrMessage, only the login-state health text."""
    run_proxy(sup, control, tmp_path, "app", reusable=True)
    control.admin("set_fault", register_status=401)
    control.admin("delete_node", id=control.node_named("app")["id"])
    failed = sup.wait_state("app", "failed", 60)
    assert "http 401" in failed["reason"]
    assert sup.status()["app"]["recoveries"] == 1


def test_crashing_tailscaled_backs_off_then_fails_at_the_start_limit(sup, control, tmp_path):
    sup.settings.update(start_limit=3, start_window=120)
    path, _ = key_file(tmp_path, control, reusable=True)
    proxy_on(sup, control, "flaky", path)
    sup.start()
    n = 0
    for i in range(4):
        sup.wait_state("flaky", "running", 30, after=n)
        n = len(sup.events())
        os.kill(sup.status()["flaky"]["pid"], signal.SIGKILL)
        if i < 3:
            sup.wait_state("flaky", "backoff", 10, after=n)
    failed = sup.wait_state("flaky", "failed", 10, after=n)
    assert "start_limit" == failed["event"]
    st = sup.status()["flaky"]
    assert st["restarts"] == 3 and st["recoveries"] == 0 and st["pid"] is None


def test_serve_config_removed_by_hand_is_put_back_without_touching_tailscaled(sup, control, tmp_path, bins):
    """Level-triggered: nothing on the bus says the serve config changed; the
    reconcile timer sees it, names it, and re-applies serve alone."""
    sup.settings.update(reconcile_period=0.5)
    run_proxy(sup, control, tmp_path, "app", reusable=True)
    pid = sup.status()["app"]["pid"]
    sock = sup.data_dir / "proxies" / "app" / "state" / "tailscaled.sock"
    n = len(sup.events())
    subprocess.run([str(bins.tailscale), f"--socket={sock}", "serve", "reset"], check=True,
                   capture_output=True, timeout=30)
    drift = sup.wait_event(lambda e: e["proxy"] == "app" and e["event"] == "drift", 10, "drift", after=n)
    assert "serve config differs: missing http :80 -> http://127.0.0.1:8080" in drift["reason"]
    sup.wait_event(lambda e: e["proxy"] == "app" and e["event"] == "serve_applied", 10, "re-apply", after=n)
    st = sup.status()["app"]
    assert (st["state"], st["pid"], st["restarts"]) == ("running", pid, 0)
    out = subprocess.run([str(bins.tailscale), f"--socket={sock}", "serve", "status", "--json"],
                         capture_output=True, text=True, timeout=30)
    assert "http://127.0.0.1:8080" in out.stdout


def test_hung_tailscaled_is_restarted(sup, control, tmp_path):
    sup.settings.update(hang_timeout=1.0)
    run_proxy(sup, control, tmp_path, "app", reusable=True)
    pid = sup.status()["app"]["pid"]
    n = len(sup.events())
    os.kill(pid, signal.SIGSTOP)
    ev = sup.wait_state("app", "backoff", 15, after=n)
    assert "did not answer" in ev["reason"]
    sup.wait_state("app", "running", 30, after=n)
    assert sup.status()["app"]["pid"] != pid
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_embedded_proxy_keeps_its_name_after_a_corrupt_state_wipe(sup):
    """The wiped node still exists on the control (offline); the embedded
    control replaces it, so the proxy keeps its DNS name instead of a `-1`."""
    sup.write_proxy("web", hostname="web", target="http://127.0.0.1:9", serve="http", port=80,
                    login_server="embedded")
    sup.start()
    sup.wait_state("web", "running")
    assert sup.stop() == 0
    (sup.data_dir / "proxies" / "web" / "state" / "tailscaled.state").write_bytes(b"")
    n = len(sup.events())
    sup.start()
    sup.wait_state("web", "running", 30, after=n)
    st = sup.status()["web"]
    assert st["recoveries"] == 1 and st["dns_name"] == "web.tailnet.test"
    nodes = AdminClient.from_data_dir(sup.data_dir / "control").nodes()
    assert [x["name"] for x in nodes] == ["web"]
