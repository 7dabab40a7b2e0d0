"""A recovery that must register a new node keeps the old one's identity through
the Tailscale API: the old device is deleted first (only that node ID, only once
offline), a `-1` name is renamed back, the old IPv4 is set back when free, and
one `identity` event (also to webhooks) says what happened. Without an API
credential, or for a moved control, nothing is deleted and the event says why.

Real tailscaled against the project's control through its v2 API, our model of
hosted control (README "Credentials")."""
from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from supervisor import tsapi
from tests.fixtures_control import ControlThread
from tests.harness import Node, wait_for
from tests.supervisor_harness import SupervisorProc
from tests.test_notify_metrics import Receiver
from tests.test_supervisor import key_file, proxy_on

pytestmark = pytest.mark.real


def with_token(sup: SupervisorProc, control, tmp_path: Path) -> Path:
    """An API access token for `control`'s tailnet in a file; the API base is `control`."""
    sup.settings.update(api_base=control.url)
    path = tmp_path / "api.token"
    path.write_text(control.admin("create_api_token")["secret"] + "\n")
    path.chmod(0o600)
    return path


def start_app(sup: SupervisorProc, control, tmp_path: Path, token: Path | None = None, bins=None) -> dict:
    """Proxy `app` on `control` with a reusable key (and the API token, if given),
    running; returns what the control says about its node."""
    if bins is not None:
        sup.settings.update(tailscale=str(bins.tailscale), tailscaled=str(bins.tailscaled))
    keyfile, _ = key_file(tmp_path, control, "app", reusable=True)
    proxy_on(sup, control, "app", keyfile, **({"api_token_file": str(token)} if token else {}))
    sup.start()
    sup.wait_state("app", "running")
    wait_for(lambda: (sup.data_dir / "proxies" / "app" / "node.json").exists(), 10, "the node recorded")
    return control.node_named("app")


def ipv4(node: dict) -> str:
    return next(a for a in node["addresses"] if "." in a)


def corrupt_without_copy(sup: SupervisorProc) -> None:
    """A power cut truncated the state, and there is no copy to restore: the one wipe."""
    proxy_dir = sup.data_dir / "proxies" / "app"
    (proxy_dir / "state" / "tailscaled.state").write_bytes(b"")
    (proxy_dir / "tailscaled.state.good").unlink()


def record(sup: SupervisorProc) -> dict[str, Any]:
    return json.loads((sup.data_dir / "proxies" / "app" / "node.json").read_text())


def identity_event(sup: SupervisorProc, after: int, timeout: float = 60) -> dict[str, Any]:
    return sup.wait_event(lambda e: e["proxy"] == "app" and e["event"] == "identity", timeout,
                          "the identity outcome", after=after)


def steps(sup: SupervisorProc, after: int) -> list[str]:
    return [e["reason"] for e in sup.events()[after:] if e["proxy"] == "app" and e["event"] == "identity_step"]


def kinds(control, since: float) -> list[tuple[str, Any]]:
    return [(e["kind"], e.get("node")) for e in control.events(since)
            if e["kind"] in ("node_deleted", "node_created", "register_ok")]


def test_corrupt_state_with_no_copy_keeps_the_name_and_ip_through_the_api(sup, control, tmp_path, any_bins):
    receiver = Receiver(fail_first=0)
    try:
        sup.settings["webhook"] = [{"url": receiver.url, "format": "json"}]
        old = start_app(sup, control, tmp_path, with_token(sup, control, tmp_path), any_bins)
        before = record(sup)
        assert before["control_url"] == control.url and before["node_id"]
        assert sup.stop() == 0
        corrupt_without_copy(sup)

        n, t0 = len(sup.events()), time.monotonic()
        sup.start()
        ev = identity_event(sup, n)
        assert ev["reason"] == f"identity kept: app, {ipv4(old)}"
        # the old device went first, then the new login registered a new node
        seen = kinds(control, t0)
        assert seen.index(("node_deleted", old["id"])) < next(i for i, (k, _) in enumerate(seen)
                                                               if k == "node_created")
        new = control.node_named("app")
        assert new["id"] != old["id"] and new["name"] == "app" and ipv4(new) == ipv4(old)
        assert [x["name"] for x in control.nodes()] == ["app"]
        assert any("deleted the old device app" in s and "before the new login" in s for s in steps(sup, n))
        # the node saw its address in a netmap; the proxy is running and node.json names it
        # (the old record names the old IP too: wait for the new node's record)
        wait_for(lambda: ipv4(old) in sup.status()["app"]["tailscale_ips"]
                 and record(sup)["node_id"] != before["node_id"]
                 and record(sup)["tailscale_ips"][0] == ipv4(old), 40, "the old IP, seen and recorded")
        st = sup.status()["app"]
        assert st["state"] == "running" and st["dns_name"] == "app.tailnet.test" and st["recoveries"] == 1
        assert record(sup)["node_id"] == st["node_id"] != before["node_id"]
        wait_for(lambda: any(b["event"] == "identity" and b["reason"] == ev["reason"]
                             for b in receiver.bodies()), 20, "the identity note at the webhook")
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()


def test_without_an_api_credential_the_new_node_may_carry_a_suffix_and_the_event_says_why(
        sup, control, tmp_path):
    old = start_app(sup, control, tmp_path)  # login_server written out, an auth key file, no credential
    assert sup.stop() == 0
    corrupt_without_copy(sup)

    n, t0 = len(sup.events()), time.monotonic()
    sup.start()
    ev = identity_event(sup, n)
    new = next(x for x in control.nodes() if x["id"] != old["id"])
    assert ev["reason"] == (f"identity not kept: no API credential; the name may carry -1; now app-1, "
                            f"{ipv4(new)} (was app, {ipv4(old)})")
    assert sorted(x["name"] for x in control.nodes()) == ["app", "app-1"]  # today's behaviour
    assert not [k for k in kinds(control, t0) if k[0] == "node_deleted"]
    assert sup.status()["app"]["state"] == "running"
    wait_for(lambda: record(sup)["dns_name"] == "app-1.tailnet.test", 20, "node.json to name the new node")


def test_a_deleted_node_leaves_nothing_to_delete_and_the_new_node_gets_the_name_and_old_ip(
        sup, control, tmp_path):
    old = start_app(sup, control, tmp_path, with_token(sup, control, tmp_path))
    n = len(sup.events())
    control.admin("delete_node", id=old["id"])  # by hand, in the admin console

    ev = identity_event(sup, n)
    assert ev["reason"] == f"identity kept: app, {ipv4(old)}"
    assert any(s.startswith("old device app (") and s.endswith("is not listed: nothing to delete")
               for s in steps(sup, n))
    new = control.node_named("app")
    assert new["id"] != old["id"] and new["name"] == "app" and ipv4(new) == ipv4(old)
    wait_for(lambda: ipv4(old) in sup.status()["app"]["tailscale_ips"], 20, "the node to see its old IP")
    assert sup.status()["app"]["state"] == "running"


def test_a_deleted_node_whose_ip_is_taken_keeps_the_name_and_notes_the_address(
        sup, control, tmp_path, bins):
    old = start_app(sup, control, tmp_path, with_token(sup, control, tmp_path))
    assert sup.stop() == 0
    control.admin("delete_node", id=old["id"])
    other = Node(bins=bins, statedir=tmp_path / "other", control_url=control.url)
    try:
        other.start()
        other.up(control.create_key()["secret"], "other")
        api = tsapi.Client(control.url, tsapi.Credential("token", control.admin("create_api_token")["secret"]))
        asyncio.run(api.set_ipv4(str(control.node_named("other")["id"]), ipv4(old)))  # someone took it

        n = len(sup.events())
        sup.start()
        ev = identity_event(sup, n)
        new = control.node_named("app")
        assert new["name"] == "app" and ipv4(new) != ipv4(old)
        assert ev["reason"].startswith(f"identity not kept: address {ipv4(old)} not set back: tailscale API "
                                       f"POST /api/v2/device/")
        assert ev["reason"].endswith(f"400 address already in use; now app, {ipv4(new)} (was app, {ipv4(old)})")
        assert sup.status()["app"]["state"] == "running"  # a note, not an error
    finally:
        other.kill()


def test_the_api_failing_during_a_recovery_lets_the_login_proceed_and_skips_the_identity_steps(
        sup, control, tmp_path):
    old = start_app(sup, control, tmp_path, with_token(sup, control, tmp_path))  # a reusable key + a token
    assert sup.stop() == 0
    corrupt_without_copy(sup)
    control.admin("set_fault", api_status=503)

    n = len(sup.events())
    sup.start()
    sup.wait_state("app", "running", 60, after=n)
    ev = identity_event(sup, n)
    new = next(x for x in control.nodes() if x["id"] != old["id"])
    assert ev["reason"].startswith("identity not kept: API unavailable: identity steps skipped (tailscale API GET "
                                   "/api/v2/device/")
    assert ev["reason"].endswith(f"503 API fault injected (HTTP 503)); now app-1, {ipv4(new)} "
                                 f"(was app, {ipv4(old)})")
    assert any(s.startswith("old device not deleted before the login: tailscale API GET") for s in steps(sup, n))
    assert sorted(x["name"] for x in control.nodes()) == ["app", "app-1"]  # nothing deleted
    assert sup.status()["app"]["recoveries"] == 1


def test_a_moved_control_never_deletes_or_changes_anything_on_the_old_one(sup, control, tmp_path):
    token = with_token(sup, control, tmp_path)  # the API base stays the OLD control: it could delete there
    old = start_app(sup, control, tmp_path, token)
    other = ControlThread(tmp_path / "control-b", ephemeral_reap_after=0.0)
    try:
        t0 = time.monotonic()
        keyfile, _ = key_file(tmp_path, other, "app-b", reusable=True)
        n = len(sup.events())
        proxy_on(sup, other, "app", keyfile, api_token_file=str(token))  # login_server moved
        sup.wait_event(lambda e: e["proxy"] == "app" and e["event"] == "reregistering", 30,
                       "the planned re-registration", after=n)
        ev = identity_event(sup, n)
        assert ev["reason"] == (f"identity not kept: the control moved (the old node is on {control.url}): "
                                f"nothing deleted or changed there; now app, {ipv4(other.node_named('app'))}")
        still = control.node_named("app")
        assert (still["id"], still["name"], still["addresses"]) == (old["id"], "app", old["addresses"])
        assert not [e for e in control.events(t0) if e["kind"].startswith("node_")
                    and e["kind"] not in ("node_offline",)]
        assert other.node_named("app")["name"] == "app"
        wait_for(lambda: record(sup)["control_url"] == other.url, 20, "node.json to name the new control")
    finally:
        other.close()


def test_an_old_device_still_online_is_left_alone_then_deleted_and_renamed_away_once_offline(
        sup, control, tmp_path, bins):
    """A clone of the NAS runs the old node: not deleted while online, so the new node
    is `app-1`; once the clone stops, the old device goes and the new one is renamed."""
    sup.settings.update(start_timeout=20)
    old = start_app(sup, control, tmp_path, with_token(sup, control, tmp_path))
    assert sup.stop() == 0
    clone_dir = tmp_path / "clone"
    shutil.copytree(sup.data_dir / "proxies" / "app" / "state", clone_dir,
                    ignore=shutil.ignore_patterns("*.sock"))
    clone = Node(bins=bins, statedir=clone_dir, control_url=control.url)
    try:
        clone.start()
        wait_for(lambda: control.node_named("app")["online"], 20, "the clone online as the old node")
        corrupt_without_copy(sup)
        n = len(sup.events())
        sup.start()
        sup.wait_event(lambda e: e["proxy"] == "app" and e["event"] == "identity_step"
                       and e["reason"].startswith("old device still online: not deleted"), 40,
                       "the old device left alone", after=n)
        sup.wait_state("app", "running", 40, after=n)
        assert sorted(x["name"] for x in control.nodes()) == ["app", "app-1"]
    finally:
        clone.kill()
    ev = identity_event(sup, n)
    assert ev["reason"] == f"identity kept: app, {ipv4(old)}"
    assert [x["name"] for x in control.nodes()] == ["app"] and control.node_named("app")["id"] != old["id"]
    assert "renamed app-1 to app" in steps(sup, n)
    wait_for(lambda: sup.status()["app"]["dns_name"] == "app.tailnet.test"
             and sup.status()["app"]["state"] == "running", 30, "the proxy running under its old name")
