"""Corrupt state is repaired before it is wiped: the node, its name and its
IP survive a power cut that truncated tailscaled.state."""
from __future__ import annotations

import shutil
import time

import pytest

from tests.harness import wait_for
from tests.test_supervisor import run_proxy

pytestmark = pytest.mark.real


def use_bins(sup, bins) -> None:
    sup.settings.update(tailscale=str(bins.tailscale), tailscaled=str(bins.tailscaled))


def app_events(sup, after: int) -> list[str]:
    return [e["event"] for e in sup.events()[after:] if e["proxy"] == "app"]


def _identity(sup, control) -> tuple:
    st = sup.status()["app"]
    return control.node_named("app")["id"], st["dns_name"], tuple(st["tailscale_ips"])


def test_a_zero_byte_state_with_an_intact_tmp_beside_it_keeps_the_node(sup, control, tmp_path, any_bins):
    use_bins(sup, any_bins)
    run_proxy(sup, control, tmp_path, "app", reusable=True)
    before = _identity(sup, control)
    assert sup.stop() == 0
    state = sup.data_dir / "proxies" / "app" / "state" / "tailscaled.state"
    shutil.copy(state, state.with_name("tailscaled.state.tmp4242"))  # the write a power cut interrupted
    state.write_bytes(b"")
    (sup.data_dir / "proxies" / "app" / "tailscaled.state.good").unlink()  # only the .tmp can help
    n = len(sup.events())
    t0 = time.monotonic()
    sup.start()
    sup.wait_state("app", "running", 30, after=n)
    assert _identity(sup, control) == before
    assert "restored" in app_events(sup, n) and "wiped" not in app_events(sup, n)
    assert [x["hostname"] for x in control.nodes()] == ["app"]  # no new node
    assert not [e for e in control.events(t0) if e["kind"] == "register_ok" and "key" in e]


def test_a_zero_byte_state_alone_is_restored_from_the_copy_kept_while_running(sup, control, tmp_path, any_bins):
    use_bins(sup, any_bins)
    run_proxy(sup, control, tmp_path, "app", reusable=True)
    before = _identity(sup, control)
    copy = sup.data_dir / "proxies" / "app" / "tailscaled.state.good"
    wait_for(copy.exists, 10, "the copy kept once running")  # taken just after the `running` event
    assert copy.stat().st_mode & 0o777 == 0o600  # private keys: the state dir's protection
    assert sup.stop() == 0
    (sup.data_dir / "proxies" / "app" / "state" / "tailscaled.state").write_bytes(b"")
    n = len(sup.events())
    sup.start()
    sup.wait_state("app", "running", 30, after=n)
    assert _identity(sup, control) == before
    assert "restored" in app_events(sup, n) and "wiped" not in app_events(sup, n)
    assert sup.status()["app"]["recoveries"] == 1


def test_a_restored_state_that_is_rejected_gets_the_one_wipe(sup, control, tmp_path):
    """The copy is of a node deleted meanwhile: restore, the control says 404,
    then the incident's one wipe, then a new node. Never a loop."""
    run_proxy(sup, control, tmp_path, "app", reusable=True)
    assert sup.stop() == 0
    control.admin("delete_node", id=control.node_named("app")["id"])
    (sup.data_dir / "proxies" / "app" / "state" / "tailscaled.state").write_bytes(b"")
    n = len(sup.events())
    sup.start()
    sup.wait_state("app", "running", 40, after=n)
    evs = app_events(sup, n)
    assert evs.index("restored") < evs.index("wiped") and evs.count("wiped") == 1
    assert sup.status()["app"]["recoveries"] == 1  # one incident


def test_state_that_is_not_plaintext_is_never_taken_for_good(sup, control, tmp_path):
    """1.96.4's TPM migration leaves a .tmp of another format: it does not count."""
    run_proxy(sup, control, tmp_path, "app", reusable=True)
    assert sup.stop() == 0
    (sup.data_dir / "proxies" / "app" / "tailscaled.state.good").unlink()
    state = sup.data_dir / "proxies" / "app" / "state" / "tailscaled.state"
    state.with_name("tailscaled.state.tmp77").write_text('{"key": {}, "nonce": "AA==", "data": "AA=="}')
    state.write_bytes(b"")
    n = len(sup.events())
    sup.start()
    sup.wait_state("app", "running", 40, after=n)
    evs = app_events(sup, n)
    assert "restored" not in evs and evs.count("wiped") == 1


def test_a_node_deleted_after_a_restore_fails_saying_the_recovery_was_used_and_what_retries(
        sup, control, tmp_path):
    """A fresh user's report: restored state, then the node deleted 40 s later,
    went straight to `failed` without saying the one recovery was spent, when,
    or what tries again."""
    run_proxy(sup, control, tmp_path, "app", reusable=True)
    assert sup.stop() == 0
    (sup.data_dir / "proxies" / "app" / "state" / "tailscaled.state").write_bytes(b"")
    n = len(sup.events())
    sup.start()
    sup.wait_state("app", "running", 30, after=n)
    assert "restored" in app_events(sup, n)
    n = len(sup.events())
    control.admin("delete_node", id=control.node_named("app")["id"])
    failed = sup.wait_state("app", "failed", 60, after=n)
    reason = failed["reason"]
    assert reason.startswith("node deleted") and "\n" not in reason, reason
    assert "; the one recovery was used " in reason and " s ago (restored state)" in reason, reason
    assert "`ts-supervisor restart app` gives it back and tries again" in reason, reason
    assert sup.status()["app"]["reason"] == reason
    n = len(sup.events())
    out = sup.cli("restart", "app", "--data-dir", str(sup.data_dir))
    assert out.returncode == 0, out.stderr
    sup.wait_state("app", "running", 40, after=n)  # the budget back: the deleted node is replaced


def test_a_node_key_that_expired_while_stopped_logs_in_again_in_place(sup, control, tmp_path, any_bins):
    """tailscaled started on a state whose node key expired (a NAS reboot, `restart
    NAME` after failed) hears "server reports new node key … has expired" and then an
    AuthURL: an in-place re-login (facts §4d), never the stale-state wipe that the
    AuthURL alone would mean. No API credential: a wipe would show as `app-1`, a new IP."""
    use_bins(sup, any_bins)
    run_proxy(sup, control, tmp_path, "app", reusable=True)
    before = _identity(sup, control)
    assert sup.stop() == 0
    control.admin("expire_node", id=before[0])
    assert control.node_named("app")["expired"]
    n = len(sup.events())
    sup.start()
    sup.wait_state("app", "running", 40, after=n)
    evs = app_events(sup, n)
    assert "reauthenticating" in evs and "wiped" not in evs and "failed" not in evs, evs
    assert _identity(sup, control) == before  # the node, its name and its IP
    assert [x["hostname"] for x in control.nodes()] == ["app"] and not control.node_named("app")["expired"]
    assert sup.status()["app"]["state"] == "running"


def test_restart_of_a_proxy_failed_by_its_second_key_expiry_logs_in_again_in_place(sup, control, tmp_path, any_bins):
    """The tester's path: the key expires twice while running (the second finds the one
    recovery spent: failed), then `ts-supervisor restart app` starts tailscaled on the
    expired state. Before the fix that wiped it: `app-1`, a new IP."""
    use_bins(sup, any_bins)
    run_proxy(sup, control, tmp_path, "app", reusable=True)
    before = _identity(sup, control)
    n = len(sup.events())
    control.admin("expire_node", id=before[0])
    sup.wait_state("app", "recovering", 20, after=n)
    sup.wait_state("app", "running", 30, after=n)
    n = len(sup.events())
    control.admin("expire_node", id=before[0])
    assert "node key expired" in sup.wait_state("app", "failed", 20, after=n)["reason"]
    n = len(sup.events())
    out = sup.cli("restart", "app", "--data-dir", str(sup.data_dir))
    assert out.returncode == 0, out.stderr
    sup.wait_state("app", "running", 40, after=n)
    evs = app_events(sup, n)
    assert "reauthenticating" in evs and "wiped" not in evs, evs
    assert _identity(sup, control) == before
    assert [x["hostname"] for x in control.nodes()] == ["app"]
