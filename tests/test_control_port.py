"""The control's port after a `kill -9`: another user may hold it. The control says
so in one line and moves, the supervisor's own proxies follow it, the CLI never
sends the squatter anything, and a proxy whose configured control URL no longer
answers leaves `starting` by its deadline, saying so. Real tailscaled against the
project's control; the squatter is uid 65534 (setpriv)."""
from __future__ import annotations

import json

import pytest

from supervisor.control.cli import AdminClient
from tests.control.test_admin_socket import as_nobody, squatter_on
from tests.fixtures_control import ControlThread
from tests.test_supervisor import key_file, proxy_on

pytestmark = [pytest.mark.real, as_nobody]


def control_port(sup) -> int:
    return int(json.loads((sup.data_dir / "control" / "endpoint.json").read_text())["url"].rsplit(":", 1)[1])


def test_an_embedded_control_whose_port_is_squatted_says_so_once_and_its_proxy_follows(sup):
    sup.write_proxy("web", hostname="web", target="http://127.0.0.1:9", serve="http", port=80,
                    login_server="embedded")
    sup.start()
    sup.wait_state("web", "running")
    old = control_port(sup)
    sup.kill9()  # endpoint.json stays, naming the old port; the proxy's state names the old URL

    with squatter_on(old) as heard:
        n = len(sup.events())
        sup.start()
        moved = sup.wait_event(lambda e: e["event"] == "control_port_changed", 30, "the port note", after=n)
        rereg = sup.wait_event(lambda e: e["proxy"] == "web" and e["event"] == "reregistering", 30,
                               "the re-registration", after=n)
        sup.wait_state("web", "running", 30, after=n)
        new = control_port(sup)
        admin = AdminClient.from_data_dir(sup.data_dir / "control")
        assert admin.url == f"http://127.0.0.1:{new}" and new != old
        assert [(x["hostname"], x["name"]) for x in admin.nodes()] == [("web", "web")]  # the name kept
        out = sup.cli("control", "--control-dir", str(sup.data_dir / "control"), "keys", "list")
        assert out.returncode == 0, out.stderr
    assert moved["reason"] == (
        f"embedded control port {old} is held by another process; listening on http://127.0.0.1:{new} "
        f"instead: nodes configured with http://127.0.0.1:{old} must be re-pointed (the supervisor's "
        f"embedded proxies re-register by themselves)")
    assert f"logged in on http://127.0.0.1:{old}" in rereg["reason"]
    assert sup.text().count(f"control port {old}") == 1  # one line in the supervisor's output
    assert sup.status()["web"]["recoveries"] == 0
    assert heard() == []  # neither the CLI nor the proxy's tailscaled ever dialled the old port


def test_a_proxy_whose_control_url_no_longer_answers_leaves_starting_by_its_deadline_saying_so(sup, tmp_path):
    """A standalone control moved (or is gone) and someone else holds its old port: the
    proxy's file still names the old URL, which nothing can fix but an edit. The start
    deadline ends `starting`, and the reason names the URL that does not answer."""
    control = ControlThread(tmp_path / "standalone", ephemeral_reap_after=0.0)
    try:
        path, _ = key_file(tmp_path, control, "app", reusable=True)
        proxy_on(sup, control, "app", path)
        sup.start()
        sup.wait_state("app", "running")
        assert sup.stop() == 0
        port = control.port
    finally:
        control.close()

    sup.settings.update(start_timeout=10)
    with squatter_on(port):
        n = len(sup.events())
        sup.start()
        ev = sup.wait_event(lambda e: e["proxy"] == "app" and e["event"] == "timed_out", 40,
                            "the start deadline", after=n)
        st = sup.status()["app"]
    assert ev["reason"].startswith("not serving after 10s: tailscaled is ")
    assert f"http://127.0.0.1:{port}/key" in ev["reason"], ev["reason"]  # tailscaled's own words, the URL in them
    assert st["state"] != "starting" or st["restarts"] >= 1
    assert f"127.0.0.1:{port}" in st["last_error"]
