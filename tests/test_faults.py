"""Faults a NAS owner runs into, against real tailscaled: a flaky control, a
spent one-off key, config typos while running, a read-only disk, a dead
target, a supervisor killed hard. Each test asserts what the user would see:
state in `status`, events, and what the control was asked to do."""
from __future__ import annotations

import http.server
import subprocess
import threading
import time

import psutil
import pytest

from supervisor import ipc
from tests.conftest import BODY, _Handler
from tests.harness import curl_via, free_port, wait_for
from tests.test_supervisor import key_file, proxy_on, registrations, run_proxy

pytestmark = pytest.mark.real


def use_bins(sup, any_bins) -> None:
    sup.settings.update(tailscale=str(any_bins.tailscale), tailscaled=str(any_bins.tailscaled))


def app_events(sup, after: int, proxy: str = "app") -> list[dict]:
    return [e for e in sup.events()[after:] if e["proxy"] == proxy]


def atomic_write(path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def test_control_http_500_for_a_while_touches_nothing(sup, control, tmp_path, any_bins):
    """A 5xx is an outage, not a rejection: no wipe, no relaunch, no restart."""
    use_bins(sup, any_bins)
    run_proxy(sup, control, tmp_path, "app", reusable=True)
    before = sup.status()["app"]
    state = sup.data_dir / "proxies" / "app" / "state" / "tailscaled.state"
    inode = state.stat().st_ino
    n = len(sup.events())

    control.admin("set_fault", status=500)
    deadline = time.monotonic() + 15  # observation window: nothing may happen
    while time.monotonic() < deadline:
        st = sup.status()["app"]
        assert st["state"] == "running" and st["pid"] == before["pid"]
        assert state.stat().st_ino == inode
        assert not [e for e in sup.events()[n:] if e["event"] in ("recovering", "wiped")]
        time.sleep(0.5)
    control.admin("set_fault", status=None)

    after = sup.status()["app"]
    assert after["state"] == "running" and after["pid"] == before["pid"]
    assert after["recoveries"] == 0 and after["restarts"] == 0
    assert after["tailscale_ips"] == before["tailscale_ips"]
    assert not [e for e in app_events(sup, n) if e["state"] not in (None, "running")]


def test_spent_single_use_key_wipes_once_then_failed(sup, control, tmp_path, any_bins):
    """The README's warning made concrete: a one-off key turns the single
    recovery into `failed`, with the control's reason, and no retry loop."""
    use_bins(sup, any_bins)
    key = run_proxy(sup, control, tmp_path, "app", reusable=False)
    n = len(sup.events())
    control.admin("delete_node", id=control.node_named("app")["id"])

    failed = sup.wait_state("app", "failed", 60, after=n)
    want = f"invalid key: API key {key['id']} not valid"
    assert want in failed["reason"]
    # `failed` is written just before the children are stopped (a few ms).
    st = wait_for(lambda: (s := sup.status()["app"])["pid"] is None and s, 10, "children stopped")
    assert st["state"] == "failed" and st["recoveries"] == 1
    assert want in st["last_error"]
    assert [e["event"] for e in app_events(sup, n)].count("wiped") == 1
    wait_for(lambda: not [p for p in sup.children() if "tailscale" in p.name()], 10, "no children")

    t_failed = time.monotonic()
    time.sleep(5)  # observation window: nothing registers after `failed`
    assert [e for e in control.events(t_failed) if e["kind"].startswith("register")] == []
    assert sup.status()["app"]["state"] == "failed"


def test_malformed_config_mid_run_keeps_the_proxy_running(sup, control, tmp_path, any_bins):
    """A half-saved edit must not cost a running proxy its node: one
    config_error, same pid; the fixed file (same content) changes nothing."""
    use_bins(sup, any_bins)
    run_proxy(sup, control, tmp_path, "app", reusable=True)
    pid = sup.status()["app"]["pid"]
    path = sup.config_dir / "app.toml"
    good = path.read_text()
    n = len(sup.events())

    atomic_write(path, 'hostname = "app\ntarget = \n')
    ev = sup.wait_event(lambda e: e["event"] == "config_error", 10, "config_error", after=n)
    assert ev["proxy"] == "app" and "app.toml" in ev["reason"] and "\n" not in ev["reason"]
    st = sup.status()["app"]
    assert st["state"] == "running" and st["pid"] == pid

    atomic_write(path, good)
    wait_for(lambda: ipc.call(sup.data_dir, "status")["config_errors"] == [], 10,
             "the fixed file to be reloaded")
    st = sup.status()["app"]
    assert st["state"] == "running" and st["pid"] == pid and st["restarts"] == 0
    assert [e["event"] for e in app_events(sup, n)] == ["config_error"]


@pytest.mark.parametrize("newcomer", ["zzz", "aaa"])  # sorting after and before the incumbent
def test_duplicate_hostname_added_mid_run_is_refused(sup, control, tmp_path, newcomer):
    """The running proxy keeps its hostname, whatever the newcomer's file is called."""
    run_proxy(sup, control, tmp_path, "app", reusable=True)
    path = tmp_path / "app.secret"
    pid = sup.status()["app"]["pid"]
    n = len(sup.events())

    sup.write_proxy(newcomer, hostname="app", target="http://127.0.0.1:9", serve="http", port=80,
                    login_server=control.url, auth_key_file=str(path))
    ev = sup.wait_event(lambda e: e["event"] == "config_error", 10, "config_error", after=n)
    assert ev["proxy"] == newcomer and "hostname" in ev["reason"] and "app.toml" in ev["reason"]
    time.sleep(3)  # observation window: longer than a conf.d poll, nothing else may happen
    st = sup.status()
    assert set(st) == {"app"} and st["app"]["pid"] == pid and st["app"]["state"] == "running"
    assert app_events(sup, n) == [] and app_events(sup, n, newcomer) == [ev]
    assert [x["hostname"] for x in control.nodes()] == ["app"]


def test_read_only_statedir_fails_alone_without_a_loop(sup, control, tmp_path, any_bins):
    """Observed (1.96.4 and 1.78.1): tailscaled cannot create its LocalAPI
    socket in the state dir and exits at once with status 1, `safesocket.Listen:
    listen unix …/tailscaled.sock: bind: read-only file system`. That is a
    crash, not a rejection: backoff restarts up to start_limit, then `failed`
    with that line as the reason. No wipe (nothing could be removed anyway),
    no key sent, the node on the control intact, and the other proxy runs."""
    use_bins(sup, any_bins)
    sup.settings.update(start_limit=3, start_window=300)
    run_proxy(sup, control, tmp_path, "ro", reusable=True)
    node = control.node_named("ro")
    assert sup.stop() == 0
    d = sup.data_dir / "proxies" / "ro" / "state"
    state_bytes = (d / "tailscaled.state").read_bytes()
    path, _ = key_file(tmp_path, control, "ok", reusable=True)
    proxy_on(sup, control, "ok", path)

    subprocess.run(["mount", "--bind", str(d), str(d)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(d)], check=True)
        n = len(sup.events())
        t0 = time.monotonic()
        sup.start()
        sup.wait_state("ok", "running", 30, after=n)
        failed = sup.wait_state("ro", "failed", 30, after=n)
        assert failed["event"] == "start_limit"
        assert "read-only file system" in failed["reason"]
        time.sleep(3)  # observation window: a failed proxy stays failed
        st = sup.status()
        ro_events = app_events(sup, n, "ro")
        assert ro_events[-1] == failed and st["ro"]["state"] == "failed"
        assert st["ro"]["restarts"] <= 3 and st["ro"]["recoveries"] == 0
        assert [e["event"] for e in ro_events].count("wiped") <= 1
        assert not [e for e in control.events(t0) if e.get("hostname") == "ro"]
        assert (d / "tailscaled.state").read_bytes() == state_bytes
        assert control.node_named("ro")["id"] == node["id"]
        ok = st["ok"]
        assert ok["state"] == "running" and ok["restarts"] == 0 and ok["recoveries"] == 0
        assert [e["event"] for e in app_events(sup, n, "ok") if e["state"]] == ["booted", "running"]
    finally:
        sup.stop()
        subprocess.run(["umount", str(d)], check=True)

    # The operator fixes the disk and restarts: the same node comes back, no login.
    n = len(sup.events())
    t1 = time.monotonic()
    sup.start()
    sup.wait_state("ro", "running", 30, after=n)
    assert control.node_named("ro")["id"] == node["id"]
    assert not [e for e in control.events(t1) if e["kind"] in ("node_created", "register_rejected")]


def test_target_service_down_still_runs(sup, control, tmp_path, node_factory):
    """`tailscale serve` forwards lazily, so a proxy whose local service is
    not up yet (the NAS app still booting) reaches `running` and stays there.
    Observed: a peer gets HTTP 502 with an empty body from serve, then the
    real answer as soon as the service listens — no restart needed."""
    port = free_port()  # nothing listens here
    sup.settings.update(reconcile_period=0.5)
    run_proxy(sup, control, tmp_path, "app", reusable=True, proxy={"port": port})
    before = sup.status()["app"]
    wait_for(lambda: sup.status()["app"]["upstream"] == "refused", 10, "upstream seen refused")
    assert before["target"].endswith(f":{port}")

    socks = free_port()
    peer = node_factory("peer", socks5_port=socks)
    peer.up(control.create_key()["secret"], "peer")
    url = "http://app.tailnet.test/"
    code = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5",
            "--socks5-hostname", f"127.0.0.1:{socks}", url]
    wait_for(lambda: subprocess.run(code, capture_output=True, text=True).stdout == "502", 20,
             "a 502 from serve", interval=0.2)
    st = sup.status()["app"]
    assert st["state"] == "running" and st["pid"] == before["pid"] and st["last_error"] == ""

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Handler)  # the service comes up
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        wait_for(lambda: curl_via(socks, url) == BODY.decode(), 20, "the real answer", interval=0.2)
        wait_for(lambda: sup.status()["app"]["upstream"] == "ok", 10, "upstream seen ok")
    finally:
        srv.shutdown()
        srv.server_close()
    st = sup.status()["app"]
    assert st["state"] == "running" and st["pid"] == before["pid"] and st["restarts"] == 0
    # seen, never acted on: the serve config was applied once, at boot
    assert [e["event"] for e in sup.events() if e["event"].startswith("serve_")] == ["serve_applied"]


def test_supervisor_kill9_with_valid_nodes_is_no_wipe(sup, control, tmp_path):
    """A hard crash of the supervisor (OOM killer, power button) with the nodes
    still valid: a restart brings the same nodes back, no wipe, no new login."""
    path, _ = key_file(tmp_path, control, reusable=True)
    for name in ("app", "db"):
        proxy_on(sup, control, name, path)
    sup.start()
    for name in ("app", "db"):
        sup.wait_state(name, "running")
    before = sup.status()
    nodes = {n["hostname"]: n["id"] for n in control.nodes()}
    daemons = [psutil.Process(before[x]["pid"]) for x in ("app", "db")]
    sup.kill9()
    for p in daemons:
        p.wait(10)  # the parent-death pipe takes them down

    n = len(sup.events())
    t0 = time.monotonic()
    sup.start()
    for name in ("app", "db"):
        sup.wait_state(name, "running", 30, after=n)
        st = sup.status()[name]
        assert st["tailscale_ips"] == before[name]["tailscale_ips"]
        assert st["recoveries"] == 0 and st["restarts"] == 0
    assert not [e for e in sup.events()[n:] if e["event"] in ("wiped", "recovering")]
    assert {x["hostname"]: x["id"] for x in control.nodes()} == nodes
    # tailscaled re-registers its existing node key (register_ok), but no auth key is sent.
    assert not [e for e in control.events(t0) if e["kind"] == "node_created" or "key" in e]


def test_tailscaled_crash_during_http_500_outage_restarts_without_wipe(sup, control, tmp_path,
                                                                       any_bins):
    """The outage bites only on a new connection: a tailscaled restarted while
    the control answers 500 must wait it out, not wipe its node."""
    use_bins(sup, any_bins)
    run_proxy(sup, control, tmp_path, "app", reusable=True)
    before = sup.status()["app"]
    node = control.node_named("app")
    n = len(sup.events())
    control.admin("set_fault", status=500)
    psutil.Process(before["pid"]).kill()
    sup.wait_state("app", "starting", 10, after=n)
    time.sleep(5)  # observation window in the outage: 500s are only shown
    assert sup.status()["app"]["state"] == "starting"
    assert "http 500" in sup.status()["app"]["last_error"]
    assert not [e for e in sup.events()[n:] if e["event"] in ("recovering", "wiped", "failed")]
    control.admin("set_fault", status=None)
    sup.wait_state("app", "running", 60, after=n)
    st = sup.status()["app"]
    assert st["recoveries"] == 0 and st["restarts"] == 1
    assert st["tailscale_ips"] == before["tailscale_ips"]
    assert control.node_named("app")["id"] == node["id"]


def test_node_deleted_during_http_500_outage_recovers_once_after(sup, control, tmp_path):
    """While the control answers 500 the deletion cannot be seen (no 404 yet),
    so nothing is wiped; once it answers again, exactly one recovery."""
    run_proxy(sup, control, tmp_path, "app", reusable=True)
    old = control.node_named("app")
    n = len(sup.events())
    control.admin("set_fault", status=500)
    control.admin("delete_node", id=old["id"])
    time.sleep(5)  # observation window in the outage
    assert not [e for e in sup.events()[n:] if e["event"] in ("recovering", "wiped")]
    t_back = time.monotonic()
    control.admin("set_fault", status=None)
    sup.wait_state("app", "recovering", 60, after=n)
    sup.wait_state("app", "running", 30, after=n)
    st = sup.status()["app"]
    assert st["recoveries"] == 1 and "node not found" in st["last_error"]
    assert [e["event"] for e in app_events(sup, n)].count("wiped") == 1
    assert len(registrations(control, "app", since=t_back)) == 1
    assert control.node_named("app")["id"] != old["id"]


def test_duplicate_hostname_refused_while_the_incumbent_file_is_broken(sup, control, tmp_path):
    """The running proxy keeps its hostname even while its own file is
    mid-edit and unparsable: it is still on the tailnet under that name."""
    run_proxy(sup, control, tmp_path, "app", reusable=True)
    path = tmp_path / "app.secret"
    pid = sup.status()["app"]["pid"]
    n = len(sup.events())
    atomic_write(sup.config_dir / "app.toml", 'hostname = "app\n')
    sup.wait_event(lambda e: e["event"] == "config_error", 10, "config_error", after=n)

    sup.write_proxy("zzz", hostname="app", target="http://127.0.0.1:9", serve="http", port=80,
                    login_server=control.url, auth_key_file=str(path))
    ev = sup.wait_event(lambda e: e["proxy"] == "zzz", 10, "zzz refused or started", after=n)
    assert ev["event"] == "config_error" and "hostname" in ev["reason"]
    st = sup.status()
    assert set(st) == {"app"} and st["app"]["pid"] == pid
    assert [x["name"] for x in control.nodes()] == ["app"]
