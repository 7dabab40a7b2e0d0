import json

import pytest

from supervisor.config import SettingsError, load_settings
from supervisor.events import Event
from supervisor.notify import Webhook, payload, worth_telling
from supervisor.metrics import render
from supervisor.proxy import ProxySnapshot


def ev(state, kind=None, proxy="jellyfin", reason="node deleted"):
    return Event(proxy, kind or state, state, reason)


def test_only_trouble_and_the_return_from_it_are_news():
    last: dict[str, str] = {}
    told = [worth_telling(e, last) for e in
            (ev("starting"), ev("running"), ev("recovering"), ev("running", "recovered"),
             ev(None, "transient"), ev("backoff"), ev("running"), ev("failed"), ev("failed"))]
    assert told == [False, False, True, True, False, False, True, True, False]


def test_formats():
    e = ev("failed", reason="invalid key: API key k1 not valid")
    body, headers = payload(Webhook("http://x", "json"), e)
    assert json.loads(body) | {"time": None} == {"proxy": "jellyfin", "event": "failed", "state": "failed",
                                                 "reason": "invalid key: API key k1 not valid", "time": None}
    body, headers = payload(Webhook("http://x", "ntfy"), e)
    assert body.decode() == "jellyfin: failed: invalid key: API key k1 not valid"
    assert headers["Priority"] == "urgent" and "jellyfin" in headers["Title"]
    body, headers = payload(Webhook("http://x", "discord"), e)
    assert json.loads(body)["content"].startswith("**ts-supervisor** jellyfin: failed")


@pytest.mark.parametrize("text,expect", [
    ('metrics = "0.0.0.0:9101"', "metrics: must be a loopback"),
    ('[[webhook]]\nurl = "ftp://x"', "webhook #1: url"),
    ('[[webhook]]\nurl = "https://ntfy.sh/t"\nformat = "slack"', "webhook #1: format"),
    ('[[webhook]]\nurl = "https://ntfy.sh/t"\nevents = ["starting"]', "webhook #1: events"),
    ('[[webhook]]\nurl = "https://ntfy.sh/t"\nsecret = 1', "webhook #1: unknown key secret"),
])
def test_bad_settings_are_one_line_each_without_the_url(tmp_path, text, expect):
    p = tmp_path / "ts-supervisor.toml"
    p.write_text(text)
    with pytest.raises(SettingsError) as e:
        load_settings(p)
    assert expect in str(e.value) and "ntfy.sh/t" not in str(e.value)


def test_good_settings(tmp_path):
    p = tmp_path / "ts-supervisor.toml"
    p.write_text('metrics = "127.0.0.1:9101"\n[[webhook]]\nurl = "https://ntfy.sh/t"\nformat = "ntfy"\n')
    s = load_settings(p)
    assert s.metrics == "127.0.0.1:9101" and s.webhooks == (Webhook("https://ntfy.sh/t", "ntfy"),)


def test_metrics_text():
    snap = ProxySnapshot(name="a", hostname="a", state="running", tailscale_ips=(), dns_name="",
                         target="http://127.0.0.1:1", pid=1, restarts=2, recoveries=1, last_error="",
                         since=0.0)
    text = render([snap], {"a": [0.002, 0.03]}, {"a": 1234})
    lines = set(text.splitlines())
    assert 'ts_supervisor_proxy_state{proxy="a",state="running"} 1' in lines
    assert 'ts_supervisor_proxy_restarts_total{proxy="a"} 2' in lines
    assert 'ts_supervisor_detection_latency_seconds_bucket{proxy="a",le="0.0025"} 1' in lines
    assert 'ts_supervisor_detection_latency_seconds_bucket{proxy="a",le="0.05"} 2' in lines
    assert 'ts_supervisor_detection_latency_seconds_count{proxy="a"} 2' in lines
    assert 'ts_supervisor_proxy_children_rss_bytes{proxy="a"} 1234' in lines
