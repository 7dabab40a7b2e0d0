"""Faults with default thresholds, long outages, load and a full disk: the
slower part of the fault matrix. Real tailscaled throughout."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.harness import wait_for
from tests.supervisor_harness import SupervisorProc
from tests.test_supervisor import key_file, proxy_on, run_proxy

pytestmark = pytest.mark.real


def test_sigstopped_tailscaled_is_replaced_after_the_default_threshold(sup, control, tmp_path, any_bins):
    """A stopped tailscaled keeps its socket but never answers: after the default
    hang_timeout (20 s) it is treated as a crash and replaced; no state is touched."""
    sup.settings.update(tailscale=str(any_bins.tailscale), tailscaled=str(any_bins.tailscaled))
    sup.settings.pop("hang_timeout", None)
    run_proxy(sup, control, tmp_path, "app", reusable=True)
    pid = sup.status()["app"]["pid"]
    n = len(sup.events())
    t0 = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    ev = sup.wait_state("app", "backoff", 35, after=n)
    assert "did not answer for 20s" in ev["reason"]
    assert 15 < time.monotonic() - t0 < 35
    sup.wait_state("app", "running", 30, after=n)
    st = sup.status()["app"]
    assert st["pid"] != pid and st["recoveries"] == 0
    assert not [e for e in sup.events()[n:] if e["event"] == "wiped"]


def test_control_down_for_60s_wipes_nothing_and_proxies_come_back(sup, control, tmp_path, any_bins):
    sup.settings.update(tailscale=str(any_bins.tailscale), tailscaled=str(any_bins.tailscaled))
    run_proxy(sup, control, tmp_path, "steady", reusable=True)
    before = sup.status()["steady"]
    state = sup.data_dir / "proxies" / "steady" / "state" / "tailscaled.state"
    inode = state.stat().st_ino
    node = control.node_named("steady")
    n = len(sup.events())

    control.stop()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the outage: nothing may be wiped meanwhile
        assert sup.status()["steady"]["state"] == "running"
        assert state.exists()
        time.sleep(1)
    t_back = time.monotonic()
    control.start()
    control.wait_event(lambda e: e["kind"] == "map_started" and e["node"] == node["id"], 60,
                       "the node's map poll to come back", since=t_back)
    after = sup.status()["steady"]
    assert (after["state"], after["recoveries"], after["restarts"]) == ("running", 0, 0)
    assert after["pid"] == before["pid"] and after["tailscale_ips"] == before["tailscale_ips"]
    assert state.stat().st_ino == inode
    assert not [e for e in sup.events()[n:] if e["event"] in ("recovering", "wiped")]


def test_fifty_proxies_with_ten_failing_at_once(sup, control, tmp_path):
    """Ten nodes deleted at once (five of them with their keys revoked too):
    those ten recover once or end failed; the other forty are not touched."""
    sup.settings.update(start_timeout=120)
    keys = {}
    for i in range(50):
        name = f"p{i:02d}"
        path, keys[name] = key_file(tmp_path, control, name, reusable=True)
        proxy_on(sup, control, name, path)
    sup.start()
    wait_for(lambda: [p["state"] for p in sup.status().values()].count("running") == 50, 180,
             "all 50 running")
    before = sup.status()
    victims = [f"p{i:02d}" for i in range(0, 50, 5)]
    revoked = set(victims[:5])
    n = len(sup.events())
    for name in revoked:
        control.admin("revoke_key", id=keys[name]["id"])
    for name in victims:
        control.admin("delete_node", id=control.node_named(name)["id"])

    def settled() -> bool:
        st = sup.status()
        return (all(st[v]["state"] == "failed" for v in revoked)
                and all(st[v]["state"] == "running" and st[v]["recoveries"] == 1
                        for v in set(victims) - revoked))
    wait_for(settled, 120, "victims recovered or failed")
    after = sup.status()
    for name in before:
        if name not in victims:
            assert after[name]["pid"] == before[name]["pid"], name
            assert after[name]["recoveries"] == 0, name
    for name in revoked:
        assert after[name]["recoveries"] == 1 and "invalid key" in after[name]["last_error"]
    wiped = [e["proxy"] for e in sup.events()[n:] if e["event"] == "wiped"]
    assert sorted(wiped) == sorted(victims)  # one wipe each, nobody else


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)


def test_full_disk_under_the_data_dir_loses_nothing(tmp_path, control):
    """A small tmpfs as the data dir (this test's mount namespace is private),
    filled to the last byte: the supervisor keeps running and answering, wipes
    nothing, and the proxy is back once there is room again."""
    data = tmp_path / "data"
    _mount_tmpfs(data, "64m")
    sup = SupervisorProc(tmp_path / "conf.d", data)
    filler = data / "filler"
    try:
        run_proxy(sup, control, tmp_path, "app", reusable=True)
        marker = data / "proxies" / "app" / "state" / "marker"
        marker.write_text("x")
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
            except OSError:
                pass
        n = len(sup.events())
        pid = sup.status()["app"]["pid"]
        os.kill(pid, signal.SIGKILL)  # restart it while the disk is full
        wait_for(lambda: sup.status()["app"]["pid"] not in (None, pid)
                 or sup.status()["app"]["state"] in ("backoff", "failed"), 30, "a reaction")
        assert sup.proc is not None and sup.proc.poll() is None  # still alive, still answering
        assert marker.exists()
        filler.unlink()
        wait_for(lambda: sup.status()["app"]["state"] == "running"
                 and sup.status()["app"]["pid"] != pid, 90, "app running again")
        assert marker.exists() and sup.status()["app"]["recoveries"] == 0
        assert not [e for e in sup.events()[n:] if e["event"] == "wiped"]
    finally:
        sup.stop()
        filler.unlink(missing_ok=True)
        subprocess.run(["umount", "-l", str(data)], check=False)


def test_orphan_check_after_supervisor_kill9_under_load(sup, control, tmp_path):
    """kill -9 of the supervisor with ten proxies: every child goes with it."""
    for i in range(10):
        path, _ = key_file(tmp_path, control, f"k{i}", reusable=True)
        proxy_on(sup, control, f"k{i}", path)
    sup.start()
    wait_for(lambda: [p["state"] for p in sup.status().values()].count("running") == 10, 60,
             "ten running")
    kids = sup.children()
    assert len([p for p in kids if p.name() == "tailscaled"]) == 10  # serve runs in tailscaled (--bg)
    sup.kill9()
    gone, alive = psutil.wait_procs(kids, timeout=10)
    assert not alive, [p.cmdline()[:2] for p in alive]
