"""Webhooks, the metrics endpoint and sd_notify, against a real supervisor with
real proxies on the test control."""
from __future__ import annotations

import http.server
import json
import re
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from tests.harness import wait_for
from tests.test_supervisor import run_proxy

pytestmark = pytest.mark.real


class Receiver:
    """A local webhook receiver whose first `fail_first` requests get HTTP 500."""

    def __init__(self, fail_first: int) -> None:
        self.fail_first = fail_first
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with outer.lock:
                    outer.requests.append((self.path, dict(self.headers), body))
                    failing = len(outer.requests) <= outer.fail_first
                self.send_response(500 if failing else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook/s3cr3t-token"

    def bodies(self) -> list[dict]:
        with self.lock:
            return [json.loads(b) for _, _, b in self.requests]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(fail_first=1)
    yield r
    r.server.shutdown()
    r.server.server_close()


@pytest.fixture
def garbage() -> Iterator[str]:
    """A receiver that answers every POST with bytes that are not HTTP (BadStatusLine)."""
    srv = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(65536)
                    conn.sendall(b"garbage\r\n\r\n")
                except OSError:
                    pass

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}/hook/garbage-token"
    done.set()
    srv.close()


def test_webhook_fires_on_recovery_and_return_with_a_retry(sup, control, tmp_path, receiver, garbage):
    """A second webhook whose receiver answers garbage costs its own deliveries
    (one webhook_failed note, no URL), never the first's."""
    sup.settings["webhook"] = [{"url": garbage, "format": "json"}, {"url": receiver.url, "format": "json"}]
    run_proxy(sup, control, tmp_path, "app", reusable=True)
    assert receiver.requests == []  # a first start is not news
    n = len(sup.events())
    control.admin("delete_node", id=control.node_named("app")["id"])
    sup.wait_state("app", "recovering", 10, after=n)
    sup.wait_state("app", "running", 30, after=n)
    # and the note of what the recovery kept (no API credential here: nothing)
    wait_for(lambda: [b["state"] or b["event"] for b in receiver.bodies()][-3:]
             == ["recovering", "running", "identity"], 20, "recovering, running and identity delivered")
    states = [b["state"] for b in receiver.bodies()]
    assert states[0] == "recovering" and states.count("recovering") == 2  # the 500, then the retry
    assert receiver.bodies()[-1]["proxy"] == "app"
    failed = sup.wait_event(lambda e: e["event"] == "webhook_failed", 40, "the garbage webhook's note",
                            after=n)
    assert failed["reason"].startswith("webhook #1: gave up on app recovering: 5 attempts")
    logs = sup.text() + "".join(f.read_text(errors="replace") for f in sup.data_dir.rglob("*.jsonl"))
    assert "s3cr3t-token" not in logs and "garbage-token" not in logs
    assert "Traceback" not in sup.text()


def _metrics_url(sup) -> str:
    ev = sup.wait_event(lambda e: e["event"] == "metrics", 10, "metrics note")
    return re.search(r"http://\S+/metrics", ev["reason"]).group(0)


def _scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_endpoint_exports_state_counters_latency_and_memory(sup, control, tmp_path):
    sup.settings.update(metrics="127.0.0.1:0", memory_period=0.5)
    run_proxy(sup, control, tmp_path, "app", reusable=True)
    url = _metrics_url(sup)
    m = wait_for(lambda: (m := _scrape(url)).get('ts_supervisor_proxy_children_pss_bytes{proxy="app"}') and m,
                 20, "a memory sample of app's tailscaled")
    assert m['ts_supervisor_proxy_state{proxy="app",state="running"}'] == 1
    assert m['ts_supervisor_proxy_state{proxy="app",state="failed"}'] == 0
    assert m['ts_supervisor_proxy_recoveries_total{proxy="app"}'] == 0
    pss = m['ts_supervisor_proxy_children_pss_bytes{proxy="app"}']
    uss = m['ts_supervisor_proxy_children_uss_bytes{proxy="app"}']
    rss = m['ts_supervisor_proxy_children_rss_bytes{proxy="app"}']  # deprecated, kept for one release
    assert 2 * 2**20 < uss <= pss <= rss  # a real tailscaled: private pages, its share of the binary's
    memory = sup.status()["app"]["memory"]  # the same sample in status --json
    assert memory["children"] >= 1 and memory["uss"] <= memory["pss"] <= memory["rss"]

    n = len(sup.events())
    control.admin("delete_node", id=control.node_named("app")["id"])
    sup.wait_state("app", "running", 30, after=n)
    m = _scrape(url)
    assert m['ts_supervisor_proxy_recoveries_total{proxy="app"}'] == 1
    count = m['ts_supervisor_detection_latency_seconds_count{proxy="app"}']
    assert count >= 1
    assert m['ts_supervisor_detection_latency_seconds_bucket{proxy="app",le="+Inf"}'] == count
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(url.replace("/metrics", "/other"), timeout=5)


def test_ready_is_signalled_to_systemd(sup, control, tmp_path):
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.settimeout(30)
        sup.env["NOTIFY_SOCKET"] = str(path)
        run_proxy(sup, control, tmp_path, "app", reusable=True)
        msg = s.recv(4096).decode()
        assert "READY=1" in msg and "app" in msg
        sup.stop()
        assert "STOPPING=1" in s.recv(4096).decode()
