"""Shared fixtures: the network-namespace guard, the process-leak check, and
real tailscaled nodes.

Real-binary tests only run inside the private namespace made by scripts/test
(only `lo`, so nothing can leave). Outside it they skip, except in CI, where
they fail: CI must never pass by skipping the tests that matter.
"""
from __future__ import annotations

import ctypes
import http.server
import os
import signal
import socket
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from supervisor import tailscale as ts
from tests.harness import Node
from tests.supervisor_harness import SupervisorProc

BODY = b"hello from the local service behind the proxy\n"

pytest_plugins = ["tests.fixtures_control"]

OLD_VERSION = "1.78.1"


def in_private_netns() -> bool:
    return (os.environ.get("TS_SUPERVISOR_NETNS") == "1"
            and [name for _, name in socket.if_nameindex()] == ["lo"])


def pytest_configure(config: pytest.Config) -> None:
    # Orphans of our children re-parent to pytest, so the leak check sees them.
    PR_SET_CHILD_SUBREAPER = 36
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if in_private_netns():
        return
    for item in items:
        if "real" in item.keywords:
            if os.environ.get("CI") == "true":
                item.add_marker(pytest.mark.xfail(reason="never", run=False, strict=True))
                raise pytest.UsageError(
                    "real-binary tests need the private network namespace; run ./scripts/test")
            item.add_marker(pytest.mark.skip(reason="not in a private network namespace (use ./scripts/test)"))


def _descendants() -> list[psutil.Process]:
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


@pytest.fixture(autouse=True)
def no_leaked_processes():
    """Fail any test that leaves a process behind (pytest is a subreaper, so
    even double-forked orphans show up here). Leaks are killed, then reported."""
    before = {p.pid for p in _descendants()}
    yield
    leaked = []
    for p in _descendants():
        if p.pid in before:
            continue
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                p.wait(0)
                continue
            leaked.append(f"{p.pid} {' '.join(p.cmdline())[:160]}")
            p.kill()
            p.wait(5)
        except psutil.Error:
            pass
    assert not leaked, "test left processes running:\n" + "\n".join(leaked)


@pytest.fixture(autouse=True)
def no_shared_secrets():
    """Secrets registered for redaction are process-wide: one test's (a key
    file of "xxxx...") must not redact another test's text."""
    from supervisor import events
    before = set(events._secrets)
    yield
    events._secrets.clear()
    events._secrets.update(before)


@pytest.fixture
def sup(tmp_path: Path) -> Iterator[SupervisorProc]:
    """A `ts-supervisor run` child on tmp_path/conf.d and tmp_path/data, stopped at teardown."""
    s = SupervisorProc(tmp_path / "conf.d", tmp_path / "data")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def bins() -> ts.Binaries:
    return ts.Binaries.locate()


@pytest.fixture(scope="session")
def bins_old() -> ts.Binaries:
    return ts.Binaries.locate(version=OLD_VERSION)


@pytest.fixture(params=["1.96.4", OLD_VERSION], ids=lambda v: f"ts{v}")
def any_bins(request: pytest.FixtureRequest) -> ts.Binaries:
    """For the subset of real tests that must also hold on lagging NAS releases."""
    return ts.Binaries.locate(version=request.param)


@pytest.fixture
def node_factory(tmp_path: Path, control):
    """Start real tailscaled nodes against the test control; all are stopped at teardown."""
    nodes: list[Node] = []

    def make(name: str = "n", bins: ts.Binaries | None = None, socks5_port: int | None = None) -> Node:
        node = Node(bins=bins or ts.Binaries.locate(), statedir=tmp_path / f"{name}{len(nodes)}",
                    control_url=control.url, socks5_port=socks5_port)
        nodes.append(node)
        return node.start()

    yield make
    for node in nodes:
        node.kill(signal.SIGTERM)


# -- local services for proxies to forward to (threads) ------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args) -> None:
        pass


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def local_http() -> Iterator[int]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def local_https(tmp_path: Path) -> Iterator[int]:
    """The usual NAS admin UI: HTTPS on 127.0.0.1 with a self-signed
    certificate (CN only, no IP SAN), which no verifying client accepts."""
    from tests.unit.test_upstream import make_cert, server_ctx
    cert, key = make_cert("nas.local")
    ctx = server_ctx(tmp_path / "tls", cert, key)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def local_echo() -> Iterator[int]:
    socketserver.ThreadingTCPServer.daemon_threads = True
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()
