"""GET /healthz and /healthz/NAME against a real supervisor with real proxies on
the test control: what an uptime monitor polling the NAS would see through a
recovery, a failed proxy, the operator stopping it, and a proxy file that does
not load until it is fixed."""
from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.harness import wait_for
from tests.test_supervisor import key_file, proxy_on

pytestmark = pytest.mark.real


def _base(sup) -> str:
    """http://127.0.0.1:PORT, from the supervisor's `metrics` note."""
    ev = sup.wait_event(lambda e: e["event"] == "metrics", 10, "metrics note")
    return re.search(r"(http://\S+)/metrics", ev["reason"]).group(1)


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            assert r.headers["Content-Type"] == "application/json"
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        assert e.headers["Content-Type"] == "application/json"
        return e.code, json.loads(e.read())


def _states(body: dict[str, Any]) -> dict[str, str]:
    return {p["name"]: p["state"] for p in body["proxies"]}


def test_healthz_through_a_recovery_a_failure_and_an_operator_stop(sup, control, tmp_path, any_bins):
    sup.settings.update(metrics="127.0.0.1:0", tailscale=str(any_bins.tailscale),
                        tailscaled=str(any_bins.tailscaled))
    proxy_on(sup, control, "app", key_file(tmp_path, control, "app", reusable=True)[0])
    proxy_on(sup, control, "spent", key_file(tmp_path, control, "spent", reusable=False)[0])
    sup.start()
    sup.wait_state("app", "running")
    sup.wait_state("spent", "running")
    base = _base(sup)

    status, body = _get(f"{base}/healthz")
    assert status == 200 and body["healthy"] is True
    assert _states(body) == {"app": "running", "spent": "running"}
    assert all(set(p) == {"name", "state", "reason", "upstream"} for p in body["proxies"])
    assert _get(f"{base}/healthz/app") == (200, {"healthy": True, "proxies": [
        next(p for p in body["proxies"] if p["name"] == "app")], "config_errors": []})
    assert _get(f"{base}/healthz/nosuch") == (404, {"error": "no proxy named nosuch"})

    # A recovery: the control forgets app's node. Poll as a monitor would, from the
    # moment of the deletion until both endpoints have said 503 and then 200 again.
    n = len(sup.events())
    control.admin("delete_node", id=control.node_named("app")["id"])
    seen: list[tuple[str, int, dict[str, Any]]] = []

    def down_then_up() -> bool:
        for path in ("/healthz", "/healthz/app"):
            status, body = _get(base + path)
            seen.append((path, status, body))
        return all(any(s == 503 for p, s, _ in seen if p == path) and
                   [s for p, s, _ in seen if p == path][-1] == 200
                   for path in ("/healthz", "/healthz/app"))

    wait_for(down_then_up, 60, "503 during app's recovery, then 200", interval=0.02)
    sup.wait_state("app", "running", 5, after=n)
    assert sup.status()["app"]["recoveries"] == 1
    for path, status, body in seen:  # every answer agrees with the states it shows
        assert (status == 200) is body["healthy"] is all(
            st == "running" for st in _states(body).values()), (path, status, body)
    recovering = [(p, b) for p, s, b in seen if s == 503 and _states(b)["app"] == "recovering"]
    assert {p for p, _ in recovering} == {"/healthz", "/healthz/app"}
    app = next(p for p in recovering[0][1]["proxies"] if p["name"] == "app")
    assert app["reason"]  # why it is not running, for whoever reads the monitor's alert
    status, body = _get(f"{base}/healthz/app")
    assert status == 200 and body["proxies"][0]["reason"] == ""  # healed: no stale reason

    # A failure: spent's node goes too, and its single-use key cannot register again.
    n = len(sup.events())
    control.admin("delete_node", id=control.node_named("spent")["id"])
    sup.wait_state("spent", "failed", 60, after=n)
    status, body = _get(f"{base}/healthz")
    assert status == 503 and body["healthy"] is False
    assert _states(body) == {"app": "running", "spent": "failed"}
    spent = next(p for p in body["proxies"] if p["name"] == "spent")
    assert "invalid key" in spent["reason"] and "tskey-" not in json.dumps(body)
    assert _get(f"{base}/healthz/app")[0] == 200  # one proxy is judged alone
    assert _get(f"{base}/healthz/spent") == (503, {"healthy": False, "proxies": [spent],
                                                  "config_errors": []})

    # The operator stops it: the fleet is healthy again, and says what it left out.
    n = len(sup.events())
    out = sup.cli("stop", "spent", "--data-dir", str(sup.data_dir))
    assert out.returncode == 0, out.stderr
    sup.wait_state("spent", "stopped", 30, after=n)
    status, body = _get(f"{base}/healthz")
    assert status == 200 and body["healthy"] is True
    assert _states(body) == {"app": "running", "spent": "stopped"}
    status, body = _get(f"{base}/healthz/spent")
    assert status == 503 and _states(body) == {"spent": "stopped"}  # not serving, as asked
    assert "Traceback" not in sup.text()


def test_a_file_that_does_not_load_is_unhealthy_until_it_is_fixed(sup):
    """A NAS user's typo in conf.d/media.toml: the proxy they configured is not
    serving, so the monitor must not hear "healthy" until the fixed file runs."""
    sup.settings.update(metrics="127.0.0.1:0")
    sup.write_proxy("app", hostname="app", target="http://127.0.0.1:9", serve="http", port=80,
                    login_server="embedded")
    media = sup.config_dir / "media.toml"
    media.write_text('hostname = "media"\ntarget = "http://127.0.0.1:9"\nlogin_server = "embedded\n')
    sup.start()
    sup.wait_state("app", "running", 60)
    base = _base(sup)

    status, body = _get(f"{base}/healthz")
    assert status == 503 and body["healthy"] is False
    assert _states(body) == {"app": "running"}  # the running proxy is listed as it is
    assert len(body["config_errors"]) == 1 and body["config_errors"][0].startswith(f"{media}: "), body
    line = body["config_errors"][0]
    assert _get(f"{base}/healthz/media") == (503, {"healthy": False, "config_errors": [line], "proxies": [
        {"name": "media", "state": "invalid", "reason": line, "upstream": None}]})
    assert _get(f"{base}/healthz/app")[0] == 200  # judged alone
    assert _get(f"{base}/healthz/nosuch") == (404, {"error": "no proxy named nosuch"})

    sup.write_proxy("media", hostname="media", target="http://127.0.0.1:9", serve="http", port=80,
                    login_server="embedded")
    seen: list[tuple[int, dict[str, Any]]] = []

    def healthy() -> bool:
        seen.append(_get(f"{base}/healthz"))
        return seen[-1][0] == 200

    wait_for(healthy, 60, "/healthz 200 once the fixed media.toml runs", interval=0.1)
    status, body = seen[-1]
    assert body == {"healthy": True, "config_errors": [], "proxies": [
        {"name": "app", "state": "running", "reason": "", "upstream": body["proxies"][0]["upstream"]},
        {"name": "media", "state": "running", "reason": "", "upstream": body["proxies"][1]["upstream"]}]}
    for status, body in seen:  # never 200 before both run with no bad file
        assert (status == 200) is (body["config_errors"] == [] and
                                   set(_states(body).values()) == {"running"} and len(body["proxies"]) == 2)
    assert _get(f"{base}/healthz/media")[0] == 200
    assert "Traceback" not in sup.text()
