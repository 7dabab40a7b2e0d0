"""Real tailscaled against the embedded control: Running, and each failure mode
exactly as the facts file records it (§4a–4e)."""
from __future__ import annotations

import ipaddress
import signal

import pytest

from supervisor import tailscale as ts
from tests.harness import wait_for

pytestmark = pytest.mark.real

STATE = ts.BackendState


def _bus_state(n: dict) -> int | None:
    return n.get("State")


def test_fresh_node_runs_with_tailnet_address_and_warm_restart_needs_no_key(node_factory, control, any_bins):
    key = control.create_key()
    node = node_factory("a", bins=any_bins)
    node.up(key["secret"], "alpha")
    st = node.wait_state(STATE.RUNNING)
    v4 = [ipaddress.ip_address(a) for a in st.tailscale_ips if ":" not in a]
    assert v4 and v4[0] in ipaddress.ip_network("100.64.0.0/10")
    assert st.dns_name == "alpha.tailnet.test"

    node.kill(signal.SIGTERM)
    node.start()  # same statedir, no `up`, no key
    st2 = node.wait_state(STATE.RUNNING, timeout=15)
    assert st2.tailscale_ips == st.tailscale_ips
    assert len(control.nodes()) == 1


def test_duplicate_hostname_gets_suffix(node_factory, control):
    key = control.create_key(reusable=True)
    a, b = node_factory("a"), node_factory("b")
    a.up(key["secret"], "twin")
    b.up(key["secret"], "twin")
    assert b.wait_state(STATE.RUNNING).dns_name == "twin-1.tailnet.test"
    assert a.status().dns_name == "twin.tailnet.test"


@pytest.mark.parametrize("spoil", ["unknown", "revoked", "expired", "spent"])
def test_bad_key_is_invalid_key_on_bus_and_up_fails(node_factory, control, spoil):
    """§4a: register Error text → `tailscale up` exit 1 and ErrMessage on the bus."""
    key = control.create_key()
    secret = key["secret"]
    expect = "invalid key: API key does not exist"
    if spoil == "unknown":
        secret = "tskey-auth-kNOPE-" + "0" * 32
    elif spoil == "revoked":
        control.admin("revoke_key", id=key["id"])
    elif spoil == "expired":
        control.admin("expire_key", id=key["id"])
        expect = f"invalid key: API key {key['id']} not valid"
    else:
        first = node_factory("first")
        first.up(secret, "first")
        expect = f"invalid key: API key {key['id']} not valid"
    node = node_factory("n")
    out = node.up(secret, "victim", check=False, timeout=10)
    assert out.returncode == 1
    assert f"backend error: {expect}" in out.stderr
    node.wait_bus(lambda n: n.get("ErrMessage") == expect, 5, "ErrMessage")
    st = node.status_raw()
    assert st["BackendState"] in ("NeedsLogin", "NoState")
    assert any(f"The last login error was: {expect}" in h for h in st.get("Health") or [])
    assert secret not in node.stderr.text()


def test_deleted_node_logs_404_and_stays_running(node_factory, control):
    """§4b: only stderr tells; status stays Running."""
    node = node_factory("a")
    node.up(control.create_key()["secret"], "doomed")
    node.wait_state(STATE.RUNNING)
    control.admin("delete_node", id=control.node_named("doomed")["id"])
    node.stderr.wait(r"PollNetMap: initial fetch failed 404: node not found", 10)
    assert node.status().backend_state == STATE.RUNNING


@pytest.mark.parametrize("how", ["deleted", "ephemeral-reaped"])
def test_stale_state_restart_needs_login_with_auth_url(node_factory, control, how, any_bins):
    """§4c: the node is gone; tailscaled restarts on its statedir → NeedsLogin + AuthURL."""
    node = node_factory("a", bins=any_bins)
    node.up(control.create_key(ephemeral=how != "deleted")["secret"], "stale")
    node.wait_state(STATE.RUNNING)
    nid = control.node_named("stale")["id"]
    if how == "deleted":
        node.kill(signal.SIGTERM)
        control.admin("delete_node", id=nid)
    else:
        node.kill(signal.SIGKILL)  # a hard crash: the map poll just ends
        control.wait_event(lambda e: e["kind"] == "node_reaped" and e["node"] == nid, 10, "reap")
    assert control.nodes() == []
    node.start()
    st = wait_for(lambda: (s := node.status_raw())["BackendState"] == "NeedsLogin" and s, 10,
                  "NeedsLogin")
    assert st["AuthURL"].startswith(control.url + "/a/")
    assert not st.get("TailscaleIPs")


def test_expired_node_key_goes_needs_login_with_self_expired(node_factory, control):
    """§4d: the control pushes a past KeyExpiry; the node drops to NeedsLogin at once."""
    node = node_factory("a")
    node.up(control.create_key()["secret"], "ages")
    node.wait_state(STATE.RUNNING)
    control.admin("expire_node", id=control.node_named("ages")["id"])
    node.wait_bus(lambda n: _bus_state(n) == 2, 5, "State NeedsLogin")
    st = node.status_raw()
    assert st["BackendState"] == "NeedsLogin"
    assert st["Self"]["Expired"] is True
    assert not st["AuthURL"]


def test_reup_with_own_spent_key_on_healthy_node_loses_control(node_factory, control):
    """§4e: hosted control re-checks a key even with a valid node key."""
    key = control.create_key()
    node = node_factory("a")
    node.up(key["secret"], "again")
    node.wait_state(STATE.RUNNING)
    node.up(key["secret"], "again", check=False, timeout=5)
    expect = f"invalid key: API key {key['id']} not valid"
    wait_for(lambda: any(expect in h for h in node.status_raw().get("Health") or []), 10,
             "login-state health")


def test_register_rejected_by_http_status_shows_in_health_without_errmessage(node_factory, control):
    """§4f."""
    control.admin("set_fault", register_status=401)
    node = node_factory("a")
    node.up(control.create_key()["secret"], "h401", check=False, timeout=3)
    wait_for(lambda: any("register request: http 401" in h
                         for h in node.status_raw().get("Health") or []), 10, "401 in health")
    assert not any(n.get("ErrMessage") for _, n in node.bus)


def test_ephemeral_node_reaped_after_kill9(node_factory, control):
    node = node_factory("a")
    node.up(control.create_key(ephemeral=True)["secret"], "eph")
    node.wait_state(STATE.RUNNING)
    nid = control.node_named("eph")["id"]
    node.kill(signal.SIGKILL)
    control.wait_event(lambda e: e["kind"] == "node_reaped" and e["node"] == nid, 10, "reap")
    assert control.nodes() == []


def test_control_state_survives_restart(node_factory, control):
    node = node_factory("a")
    node.up(control.create_key()["secret"], "keeper")
    node.wait_state(STATE.RUNNING)
    before = control.node_named("keeper")
    control.stop()
    control.start()
    assert control.node_named("keeper")["addresses"] == before["addresses"]
    # the node's map poll comes back to the restarted control by itself
    control.wait_event(lambda e: e["kind"] == "map_started" and e["node"] == before["id"], 40,
                       "map poll after restart")
    assert node.status().backend_state == STATE.RUNNING
