"""Helpers for tests that run real tailscaled: launch one with the quiet flags,
follow its stderr and IPN bus, and wait on conditions with deadlines.

Sync on purpose: each node's stderr and bus are followed by a daemon thread,
so a test reads top to bottom and every wait names what it waits for.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from supervisor import tailscale as ts

T = TypeVar("T")


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_test() -> None:
    """preexec_fn: SIGTERM this child when the test process dies (prctl
    PR_SET_PDEATHSIG), so a test run killed by a timeout never leaves a
    supervisor or tailscaled behind."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class Timeout(AssertionError):
    pass


def wait_for(pred: Callable[[], T], timeout: float, what: str, interval: float = 0.01) -> T:
    """Poll `pred` until it returns something truthy; fail naming `what`."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            value = pred()
            if value:
                return value
        except Exception as e:  # the condition may not be observable yet
            last_exc = e
        if time.monotonic() >= deadline:
            extra = f" (last error: {last_exc})" if last_exc else ""
            raise Timeout(f"timed out after {timeout:.1f}s waiting for {what}{extra}")
        time.sleep(interval)


class LineLog:
    """Lines from a stream, with a condition so waiters wake on each new line."""

    def __init__(self) -> None:
        self.lines: list[tuple[float, str]] = []
        self.cond = threading.Condition()

    def add(self, line: str) -> None:
        with self.cond:
            self.lines.append((time.monotonic(), line))
            self.cond.notify_all()

    def text(self) -> str:
        with self.cond:
            return "\n".join(l for _, l in self.lines)

    def wait(self, pattern: str, timeout: float, start: int = 0) -> tuple[float, str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            i = start
            while True:
                while i < len(self.lines):
                    t, line = self.lines[i]
                    if rx.search(line):
                        return t, line
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0:
                    tail = "\n".join(l for _, l in self.lines[-15:])
                    raise Timeout(f"no line matching {pattern!r} within {timeout}s; last lines:\n{tail}")
                self.cond.wait(left)


@dataclass
class Node:
    """One real tailscaled in its own statedir."""

    bins: ts.Binaries
    statedir: Path
    control_url: str
    socks5_port: int | None = None
    proc: subprocess.Popen | None = None
    stderr: LineLog = field(default_factory=LineLog)
    bus: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    bus_cond: threading.Condition = field(default_factory=threading.Condition)
    started_at: float = 0.0

    @property
    def socket(self) -> Path:
        return self.statedir / ts.SOCKET_FILE

    @property
    def api(self) -> ts.LocalAPI:
        return ts.LocalAPI(self.socket)

    def start(self) -> "Node":
        self.statedir.mkdir(parents=True, exist_ok=True)
        socks = f"127.0.0.1:{self.socks5_port}" if self.socks5_port else None
        argv, env = ts.tailscaled_command(self.bins, self.statedir,
                                          quiet_control_url=self.control_url, socks5_server=socks)
        self.stderr = LineLog()
        self.bus = []
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=die_with_test)
        threading.Thread(target=self._read_output, daemon=True).start()
        wait_for(lambda: self.call(self.api.request("GET", "/localapi/v0/status")), 10,
                 "LocalAPI to answer")
        threading.Thread(target=self._follow_bus, daemon=True).start()
        return self

    def _read_output(self) -> None:
        assert self.proc and self.proc.stdout
        for raw in self.proc.stdout:
            self.stderr.add(raw.decode(errors="replace").rstrip("\n"))

    def _follow_bus(self) -> None:
        async def follow() -> None:
            async for n in self.api.watch_bus_raw():
                with self.bus_cond:
                    self.bus.append((time.monotonic(), n))
                    self.bus_cond.notify_all()
        try:
            asyncio.run(follow())
        except Exception:
            pass  # tailscaled went away; the test decides whether that matters

    @staticmethod
    def call(coro: Any) -> Any:
        return asyncio.run(coro)

    def status(self) -> ts.NodeStatus:
        return self.call(self.api.status())

    def status_raw(self) -> dict[str, Any]:
        return self.call(self.api.status_raw())

    def wait_state(self, state: ts.BackendState, timeout: float = 10) -> ts.NodeStatus:
        return wait_for(lambda: (s := self.status()).backend_state == state and s,
                        timeout, f"BackendState {state.name}")

    def wait_bus(self, pred: Callable[[dict[str, Any]], bool], timeout: float,
                 what: str) -> tuple[float, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        with self.bus_cond:
            i = 0
            while True:
                while i < len(self.bus):
                    if pred(self.bus[i][1]):
                        return self.bus[i]
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Timeout(f"no bus message with {what} within {timeout}s")
                self.bus_cond.wait(left)

    def up(self, auth_key: str | None, hostname: str, timeout: float = 20,
           check: bool = True, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        """`tailscale up` with the key through a pipe, as the supervisor does
        (`--auth-key=file:/dev/fd/N`: never in argv, never on disk)."""
        read_fd = None
        if auth_key:
            read_fd, write_fd = os.pipe()
            os.write(write_fd, auth_key.encode() + b"\n")
            os.close(write_fd)
        try:
            argv = ts.up_command(self.bins, self.socket, login_server=self.control_url,
                                 hostname=hostname, auth_key_fd=read_fd, timeout=timeout)
            out = subprocess.run([*argv, *extra], capture_output=True, text=True, timeout=timeout + 10,
                                 env=ts.cli_env(), pass_fds=(read_fd,) if read_fd is not None else ())
        finally:
            if read_fd is not None:
                os.close(read_fd)
        if check and out.returncode != 0:
            raise AssertionError(f"tailscale up failed ({out.returncode}): {out.stderr}")
        return out

    def kill(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


# -- reaching a tailnet peer through a node's SOCKS5 proxy ---------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def socks5_connect(socks_port: int, ip: str, port: int, timeout: float = 5) -> socket.socket:
    """CONNECT through a SOCKS5 proxy (RFC 1928, no auth, IPv4 target)."""
    s = socket.create_connection(("127.0.0.1", socks_port), timeout=timeout)
    try:
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00", "socks5: no-auth refused"
        s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(ip) + port.to_bytes(2, "big"))
        reply = _recv_exact(s, 10)
        assert reply[1] == 0, f"socks5 CONNECT failed, reply code {reply[1]}"
        return s
    except BaseException:
        s.close()
        raise


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def echo_through(socks_port: int, ip: str, port: int, payload: bytes) -> bytes:
    with socks5_connect(socks_port, ip, port) as s:
        s.sendall(payload)
        return _recv_exact(s, len(payload))


def curl_via(socks_port: int, url: str) -> str:
    out = subprocess.run(["curl", "-sS", "--max-time", "5", "--socks5-hostname",
                          f"127.0.0.1:{socks_port}", url],
                         capture_output=True, text=True, timeout=15)
    assert out.returncode == 0, f"curl {url}: exit {out.returncode}: {out.stderr.strip()}"
    return out.stdout


@contextlib.contextmanager
def peer(bins: ts.Binaries, statedir: Path, control_url: str, key: str, hostname: str = "peer"):
    """A real tailscaled peer with a SOCKS5 port, logged in with `key`; yields
    the SOCKS5 port (for curl_via / echo_through) and is stopped on exit."""
    socks = free_port()
    node = Node(bins=bins, statedir=statedir, control_url=control_url, socks5_port=socks)
    try:
        node.start()
        node.up(key, hostname)
        yield socks
    finally:
        node.kill()
