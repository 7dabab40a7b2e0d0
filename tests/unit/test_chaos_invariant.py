"""The chaos soak's status-truth checker, as a table: what the LocalAPI must
say for a `running` proxy to be telling the truth, and the converse (a proxy
the LocalAPI shows serving must not be left starting)."""
from __future__ import annotations

import copy

import pytest

from scripts.chaos import StuckWatch, Want, shortfalls, untruth

CONTROL = "http://127.0.0.1:4000"
WANT = Want.of({"login_server": CONTROL, "hostname": "p00", "serve": "http", "port": 80,
                "target": "http://127.0.0.1:8000"})

STATUS = {"BackendState": "Running", "Self": {"ID": "n1", "TailscaleIPs": ["100.64.0.1", "fd7a::1"]}}
PREFS = {"ControlURL": CONTROL, "Hostname": "p00", "WantRunning": True, "LoggedOut": False}
SERVE = {"TCP": {"80": {"HTTP": True}},
         "Web": {"p00.tail.example:80": {"Handlers": {"/": {"Proxy": "http://127.0.0.1:8000"}}}}}
GOOD = (STATUS, PREFS, SERVE)


def changed(which: int, **keys) -> tuple:
    out = copy.deepcopy(list(GOOD))
    out[which] = {**out[which], **keys}
    return tuple(out)


def test_a_node_serving_as_configured_has_no_shortfall():
    assert shortfalls(WANT, GOOD) == []


@pytest.mark.parametrize("answers, said", [
    (changed(0, BackendState="Starting"), "BackendState 'Starting'"),
    (changed(0, BackendState="NeedsLogin"), "BackendState 'NeedsLogin'"),
    (changed(0, BackendState="Stopped"), "BackendState 'Stopped'"),
    (changed(0, BackendState=None), "BackendState None"),
    (changed(0, Self={"TailscaleIPs": []}), "no Tailscale addresses"),
    (changed(1, ControlURL="http://127.0.0.1:4001"), "ControlURL 'http://127.0.0.1:4001'"),
    (changed(1, ControlURL="https://controlplane.tailscale.com"), "ControlURL"),
    (changed(1, Hostname="chaos-p00"), "Hostname 'chaos-p00', configured 'p00'"),
    (changed(2, TCP={}, Web={}), "serves nothing, configured http :80 -> http://127.0.0.1:8000"),
    ((STATUS, PREFS, {}), "serves nothing"),
    ((STATUS, PREFS, None), "serves nothing"),
    (changed(2, TCP={"80": {"HTTP": True}, "2222": {"TCPForward": "127.0.0.1:8000"}}),
     "serves http :80 -> http://127.0.0.1:8000, tcp :2222 -> 127.0.0.1:8000"),
    (changed(2, Web={"h:80": {"Handlers": {"/": {"Proxy": "http://127.0.0.1:9999"}}}}),
     "serves http :80 -> http://127.0.0.1:9999"),
    (changed(2, TCP={"443": {"HTTPS": True}},
             Web={"h:443": {"Handlers": {"/": {"Proxy": "http://127.0.0.1:8000"}}}}), "serves https :443"),
    ("OSError: [Errno 111] Connection refused", "no answer (OSError: [Errno 111] Connection refused)"),
])
def test_each_way_a_node_falls_short_is_named_in_the_localapis_terms(answers, said):
    found = shortfalls(WANT, answers)
    assert len(found) == 1 and said in found[0], found


@pytest.mark.parametrize("control", [CONTROL + "/", CONTROL + "//"])
def test_control_urls_compare_as_tailscale_compares_them(control):
    assert shortfalls(WANT, changed(1, ControlURL=control)) == []
    hosted = Want.of({"hostname": "p00", "serve": "http", "port": 80, "target": "http://127.0.0.1:8000"})
    for url in ("https://login.tailscale.com", "https://controlplane.tailscale.com/", "", None):
        assert shortfalls(hosted, changed(1, ControlURL=url)) == []


def test_a_foreground_session_serving_the_config_counts_as_serving():
    fg = {"Foreground": {"s1": SERVE}}
    assert shortfalls(WANT, (STATUS, PREFS, fg)) == []


@pytest.mark.parametrize("answers", [
    ([], [], []), (None, None, None), ("x", 1, 2.0), ({"BackendState": 3, "Self": []}, {"Hostname": 5}, {"TCP": []}),
])
def test_answers_of_the_wrong_shape_are_shortfalls_not_crashes(answers):
    found = shortfalls(WANT, answers)
    assert found and any("BackendState" in f for f in found)


RUNNING = {"state": "running", "since": "2026-11-30T23:00:00.000+00:00"}
STARTING = {"state": "starting", "since": "2026-11-30T23:00:05.000+00:00"}


def test_running_while_the_localapi_says_otherwise_is_one_line_naming_both():
    found = shortfalls(WANT, changed(2, TCP={}, Web={}))
    v = untruth("p03", RUNNING, RUNNING, found)
    assert v is not None and "\n" not in v
    assert v.startswith("p03: status says running") and "serves nothing" in v


@pytest.mark.parametrize("before, after", [(STARTING, STARTING), (RUNNING, STARTING), (STARTING, RUNNING),
                                           ({"state": "failed"}, {"state": "failed"}), (RUNNING, {})])
def test_only_running_on_both_sides_of_the_answers_is_held_to_them(before, after):
    found = shortfalls(WANT, "OSError: gone")
    assert untruth("p03", before, after, found) is None


def test_running_and_serving_is_the_truth():
    assert untruth("p03", RUNNING, RUNNING, shortfalls(WANT, GOOD)) is None


def test_a_proxy_left_starting_while_serving_is_reported_once_after_the_bound():
    w = StuckWatch(bound=5.0, max_gap=3.0)
    assert w.see("p01", "starting", True, 100.0) is None
    assert w.see("p01", "starting", True, 102.5) is None
    assert w.see("p01", "degraded", True, 105.0) is None  # still not running: the same episode
    v = w.see("p01", "starting", True, 107.0)
    assert v is not None and v.startswith("p01: status says starting") and "7.0s" in v
    assert w.see("p01", "starting", True, 108.0) is None  # once per episode


@pytest.mark.parametrize("steps", [
    [("starting", True, 100.0), ("running", True, 102.0), ("starting", True, 104.0), ("starting", True, 108.0)],
    [("starting", True, 100.0), ("starting", False, 103.0), ("starting", True, 104.0), ("starting", True, 108.0)],
    [("starting", True, 100.0), ("starting", True, 104.0), ("starting", True, 106.0)],  # a gap: not watched
    [("failed", True, 100.0), ("failed", True, 110.0)],
    [("backoff", True, 100.0), ("backoff", True, 110.0)],
    [("running", True, 100.0), ("running", True, 110.0)],
])
def test_running_not_serving_or_an_unwatched_gap_starts_the_episode_over(steps):
    w = StuckWatch(bound=5.0, max_gap=3.0)
    assert [w.see("p01", state, serving, now) for state, serving, now in steps] == [None] * len(steps)


def test_proxies_are_watched_apart():
    w = StuckWatch(bound=5.0, max_gap=3.0)
    for now in (100.0, 102.0, 104.0):
        w.see("a", "starting", True, now)
    w.see("b", "starting", True, 102.0)
    w.see("b", "starting", True, 104.0)
    assert w.see("a", "starting", True, 106.0) is not None
    assert w.see("b", "starting", True, 106.0) is None
