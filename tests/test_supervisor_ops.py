"""Operating the supervisor: bad config, reload, orphans, the lock, a read-only
data dir. Real tailscaled against the test control throughout."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import psutil
import pytest

from tests.fixtures_control import ControlThread
from tests.harness import wait_for
from tests.supervisor_harness import ROOT
from tests.test_supervisor import key_file, proxy_on, run_proxy

pytestmark = pytest.mark.real


def test_bad_config_gets_one_line_each_and_good_proxies_run(sup, control, tmp_path):
    path, _ = key_file(tmp_path, control, reusable=True)
    proxy_on(sup, control, "app", path)
    (sup.config_dir / "broken.toml").write_text('hostname = "x\n')
    proxy_on(sup, control, "typo", path)
    text = (sup.config_dir / "typo.toml").read_text().replace("hostname", "hostnme")
    (sup.config_dir / "typo.toml").write_text(text)
    proxy_on(sup, control, "nokey", tmp_path / "missing.secret")
    sup.write_proxy("dupe", hostname="app", target="http://127.0.0.1:9", serve="http", port=80,
                    login_server=control.url, auth_key_file=str(path))

    check = sup.cli("check", "--config-dir", str(sup.config_dir))
    assert check.returncode == 1
    lines = check.stdout.strip().splitlines()
    assert len(lines) == 4, check.stdout
    for name, key in (("broken", ""), ("typo", "hostnme"), ("nokey", "auth_key_file"),
                      ("dupe", "hostname")):
        line = next(l for l in lines if f"{name}.toml" in l)
        assert key in line

    sup.start()
    sup.wait_state("app", "running")
    answer = sup.cli("status", "--data-dir", str(sup.data_dir), "--json")
    names = [p["name"] for p in json.loads(answer.stdout)["proxies"]]
    assert names == ["app"]
    errors = [e for e in sup.events() if e["event"] == "config_error"]
    assert {e["proxy"] for e in errors} == {"broken", "typo", "nokey", "dupe"}
    assert all("\n" not in e["reason"] for e in errors)


def test_reload_starts_new_stops_removed_restarts_changed_and_leaves_the_rest(sup, control, tmp_path):
    """A changed node (here its hostname) restarts; a changed target is a new
    serve config, applied in place with the same tailscaled; the rest is not
    touched."""
    path, _ = key_file(tmp_path, control, reusable=True)
    for name in ("same", "changed", "served", "gone"):
        proxy_on(sup, control, name, path)
    sup.start()
    for name in ("same", "changed", "served", "gone"):
        sup.wait_state(name, "running")
    before = sup.status()

    n = len(sup.events())
    sup.write_proxy("changed", hostname="changed-new", target="http://127.0.0.1:8080", serve="http",
                    port=80, login_server=control.url, auth_key_file=str(path))
    proxy_on(sup, control, "served", path, port=8081)
    (sup.config_dir / "gone.toml").unlink()
    proxy_on(sup, control, "new", path)
    assert sup.proc is not None
    sup.proc.send_signal(signal.SIGHUP)
    sup.wait_state("new", "running", after=n)
    sup.wait_state("changed", "running", after=n)
    gone = sup.wait_state("gone", "stopped", after=n)
    assert gone["reason"] == "removed from the config dir"
    sup.wait_event(lambda e: e["proxy"] == "served" and e["event"] == "serve_applied", 30,
                   "the new target applied in place", after=n)

    after = sup.status()
    assert set(after) == {"same", "changed", "served", "new"}
    assert after["same"]["pid"] == before["same"]["pid"]
    assert after["changed"]["pid"] != before["changed"]["pid"]
    assert after["changed"]["hostname"] == "changed-new"
    assert after["served"]["pid"] == before["served"]["pid"] and after["served"]["target"].endswith(":8081")
    assert [e["state"] for e in sup.events()[n:] if e["proxy"] == "served" and e["state"]] == []
    assert not [e for e in sup.events()[n:] if e["proxy"] == "served" and e["event"] == "drift"]  # ours
    assert not [e for e in sup.events()[n:] if e["proxy"] == "same"]

    # Without SIGHUP: the conf.d change alone is noticed.
    m = len(sup.events())
    proxy_on(sup, control, "later", path)
    sup.wait_state("later", "running", after=m)


def test_orphans_of_a_killed_supervisor_are_stopped_and_nothing_else(sup, control, tmp_path):
    run_proxy(sup, control, tmp_path, "app", reusable=True)
    orphan = psutil.Process(sup.status()["app"]["pid"])
    orphan.suspend()  # a stopped tailscaled cannot notice its parent dying
    decoy = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        sup.kill9()
        assert orphan.is_running()
        # A pidfile naming an unrelated process (pid reuse) must not get it killed.
        fake = sup.data_dir / "proxies" / "app" / "pids" / "decoy.pid"
        fake.write_text(json.dumps({"pid": decoy.pid, "create_time": 1.0,
                                    "argv": ["tailscaled", "--statedir=/nowhere"]}))
        n = len(sup.events())
        sup.start()
        ev = sup.wait_event(lambda e: e["event"] == "orphan_stopped", 20, "orphan sweep", after=n)
        assert str(orphan.pid) in ev["reason"]
        wait_for(lambda: not orphan.is_running() or orphan.status() == psutil.STATUS_ZOMBIE, 10,
                 "the orphan to be gone")
        assert decoy.poll() is None
        sup.wait_state("app", "running", after=n)
    finally:
        decoy.kill()
        decoy.wait()


def test_second_supervisor_on_same_data_dir_is_refused(sup, control, tmp_path):
    run_proxy(sup, control, tmp_path, "app", reusable=True)
    pid = sup.status()["app"]["pid"]
    out = sup.cli("run", "--no-console", "--config-dir", str(sup.config_dir),
                  "--data-dir", str(sup.data_dir))
    assert out.returncode == 1
    assert "already running" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert sup.status()["app"]["pid"] == pid


def test_read_only_data_dir_is_one_clear_error(tmp_path, control):
    """Root ignores file modes, so make it really read-only with a bind mount
    in a mount namespace of its own."""
    data = tmp_path / "data"
    data.mkdir()
    conf = tmp_path / "conf.d"
    conf.mkdir()
    script = ('mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"')
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(data),
         sys.executable, "-m", "supervisor", "run", "--no-console", "--config-dir", str(conf),
         "--data-dir", str(data)],
        cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1, out
    err = out.stderr.strip()
    assert len(err.splitlines()) == 1 and str(data) in err and "Read-only file system" in err, err
    assert "Traceback" not in out.stderr


def test_sigterm_stops_every_child_and_logs_out_ephemeral_nodes(sup, tmp_path):
    # A control that would reap only after a minute: the node must leave by logging out.
    control = ControlThread(tmp_path / "slow-reap", ephemeral_reap_after=60.0)
    try:
        _logout_on_stop(sup, control, tmp_path)
    finally:
        control.close()


def _logout_on_stop(sup, control, tmp_path):
    run_proxy(sup, control, tmp_path, "eph", reusable=True, ephemeral=True, proxy={"ephemeral": True})
    kids = sup.children()
    assert kids
    assert sup.stop() == 0
    assert control.nodes() == []  # logged out, not left for the reaper
    assert any(e["kind"] == "node_logged_out" for e in control.events())
    for p in kids:
        assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
