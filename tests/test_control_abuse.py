"""A local user against the embedded control: another uid (65534, via setpriv) holds
~1,400 idle connections to the control's port (upgraded ts2021 sessions with
unregistered machine keys, DERP handshakes with unregistered node keys, bare TCP)
and re-opens each one the control closes. While that flood is held, every proxy
(real tailscaled) still restarts to running within its start deadline, and the
supervisor's output stays a few lines, not a traceback per failed accept.

The supervisor runs with a soft RLIMIT_NOFILE of 1024 (systemd's default for a
service): before the control capped its connections, the flood took every
descriptor and the supervisor could spawn nothing, reach no LocalAPI and answer
no command (EMFILE).

The flooder uses only the standard library of a Python that uid 65534 can run; the
handshakes it replays (Noise initiations, sealed DERP client infos) are made here,
as root, with the control's public keys.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nacl.public import Box, PrivateKey, PublicKey

from supervisor.control import noise
from supervisor.control.derp import MAGIC, FrameType, frame
from tests.harness import wait_for
from tests.supervisor_harness import SupervisorProc

pytestmark = pytest.mark.real

NOBODY = 65534
SUPERVISOR_NOFILE = 1024
SLOTS = {"ts2021": 700, "derp": 500, "idle": 200}
START_DEADLINE = 60.0  # settings.start_timeout: launch -> Running, else a crash

FLOODER = r'''
"""Hold many idle connections to the control; re-open each one it closes."""
import asyncio, base64, json, random, sys

def main():
    m = json.load(open(sys.argv[1]))
    host, port = m["host"], m["port"]
    ts = [base64.b64decode(h) for h in m["ts2021"]]
    derp = [base64.b64decode(h) for h in m["derp"]]
    stats = {"opened": 0, "held": 0, "upgraded": 0, "derp_sent": 0, "first_done": 0, "failed": 0}

    async def once(kind, i):
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
        stats["opened"] += 1
        stats["held"] += 1
        try:
            if kind == "ts2021":
                w.write(ts[i % len(ts)])
                head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
                if head.startswith(b"HTTP/1.1 101"):
                    stats["upgraded"] += 1
            elif kind == "derp":
                w.write(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
                await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
                await asyncio.wait_for(r.readexactly(45), 10)  # the server key frame
                w.write(derp[i % len(derp)])
                stats["derp_sent"] += 1
            return r, w
        except BaseException:
            stats["held"] -= 1
            w.close()
            raise

    async def slot(kind, i):
        first = True
        while True:
            try:
                r, w = await once(kind, i)
            except Exception:
                stats["failed"] += 1
                r = w = None
            if first:
                stats["first_done"] += 1
                first = False
            if w is not None:
                try:
                    while await r.read(65536):  # idle: hold it until the control closes it
                        pass
                except Exception:
                    pass
                stats["held"] -= 1
                w.close()
            await asyncio.sleep(0.5 + random.random() * 0.5)

    async def report():
        while True:
            print(json.dumps(stats), flush=True)
            await asyncio.sleep(0.25)

    async def run():
        tasks = [asyncio.create_task(report())]
        for kind, n in m["slots"].items():
            tasks += [asyncio.create_task(slot(kind, i)) for i in range(n)]
        await asyncio.gather(*tasks)

    asyncio.run(run())

main()
'''


@contextlib.contextmanager
def soft_nofile(limit: int) -> Iterator[None]:
    """Children started inside inherit this soft RLIMIT_NOFILE (the test's own is restored)."""
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, old[1]), old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


def as_nobody(*argv: str) -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--", *argv]


def python_for_nobody() -> str:
    """A Python that uid 65534 can run (the project's venv may live under /root)."""
    for cand in (sys.executable, "/usr/bin/python3", shutil.which("python3") or ""):
        if cand and subprocess.run(as_nobody(cand, "-c", "pass"), capture_output=True).returncode == 0:
            return cand
    pytest.fail("no Python that uid 65534 can run (for the flooder)")


def flood_material(url: str) -> dict[str, Any]:
    """Replayable handshakes for keys the control has never registered."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with urllib.request.urlopen(f"{url}/key?v=133", timeout=5) as r:
        control_key = bytes.fromhex(json.load(r)["publicKey"].removeprefix("mkey:"))
    derp_key = derp_server_key(host, int(port))
    ts2021 = []
    for _ in range(32):
        init, _hs = noise.initiate(noise.generate_private(), control_key, 133)
        ts2021.append(base64.b64encode(
            f"POST /ts2021 HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: tailscale-control-protocol\r\n"
            f"Connection: upgrade\r\nX-Tailscale-Handshake: {base64.b64encode(init).decode()}\r\n\r\n"
            .encode()).decode())
    derp = []
    for _ in range(32):
        client = PrivateKey.generate()
        sealed = Box(client, PublicKey(derp_key)).encrypt(b'{"version":2,"CanAckPings":true}')
        derp.append(base64.b64encode(frame(FrameType.CLIENT_INFO, bytes(client.public_key) + bytes(sealed)))
                    .decode())
    return {"host": host, "port": int(port), "ts2021": ts2021, "derp": derp, "slots": SLOTS}


def derp_server_key(host: str, port: int) -> bytes:
    import socket
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < 45:
            chunk = s.recv(4096)
            assert chunk, "the control closed the DERP upgrade"
            data += chunk
        key_frame = data.split(b"\r\n\r\n", 1)[1][:45]
        assert key_frame[:1] == bytes([FrameType.SERVER_KEY]) and key_frame[5:13] == MAGIC
        return key_frame[13:45]


class Flooder:
    def __init__(self, url: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="flood-"))
        os.chmod(self.dir, 0o755)  # uid 65534 must reach the script (pytest's tmp is 0700)
        (self.dir / "flood.py").write_text(FLOODER)
        (self.dir / "material.json").write_text(json.dumps(flood_material(url)))
        for f in self.dir.iterdir():
            f.chmod(0o644)
        self.proc = subprocess.Popen(
            as_nobody(python_for_nobody(), str(self.dir / "flood.py"), str(self.dir / "material.json")),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        self.last: dict[str, int] = {}
        threading.Thread(target=self._follow, daemon=True).start()

    def _follow(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.last = json.loads(line)

    def stats(self) -> dict[str, int]:
        assert self.proc.poll() is None, f"the flooder exited {self.proc.returncode}"
        return dict(self.last)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def cli(sup: SupervisorProc, *args: str) -> subprocess.CompletedProcess:
    return sup.cli(*args, "--data-dir", str(sup.data_dir), timeout=START_DEADLINE)


@pytest.mark.parametrize("version", ["1.96.4", "1.78.1"], ids=lambda v: f"ts{v}")
def test_a_flood_from_another_uid_does_not_stop_proxies_restarting(sup, tmp_path, local_http, version):
    from supervisor import tailscale as ts
    bins = ts.Binaries.locate(version=version)
    sup.settings.update(tailscale=str(bins.tailscale), tailscaled=str(bins.tailscaled),
                        start_timeout=START_DEADLINE)
    names = ["web", "files"]
    for name in names:
        sup.write_proxy(name, hostname=name, target=f"http://127.0.0.1:{local_http}", serve="http",
                        port=80, login_server="embedded")
    with soft_nofile(SUPERVISOR_NOFILE):
        sup.start()
    for name in names:
        sup.wait_state(name, "running", START_DEADLINE)

    url = json.loads((sup.data_dir / "control" / "endpoint.json").read_text())["url"]
    quiet_before = len(sup.text().splitlines())
    flooder = Flooder(url)
    try:
        total = sum(SLOTS.values())
        wait_for(lambda: flooder.stats().get("first_done", 0) >= total, 90,
                 f"the flooder's {total} connections to have each been tried once")
        assert flooder.stats()["upgraded"] and flooder.stats()["derp_sent"], flooder.stats()

        for name in names:  # while the flood is held
            pid = sup.status()[name]["pid"]
            n = len(sup.events())
            out = cli(sup, "restart", name)
            assert out.returncode == 0, out.stderr
            sup.wait_state(name, "running", START_DEADLINE, after=n)
            assert sup.status()[name]["pid"] not in (pid, None)
        stats = flooder.stats()  # still flooding: it never stopped trying
        assert stats["opened"] > total, stats
    finally:
        flooder.stop()

    lines = sup.text().splitlines()[quiet_before:]
    assert len(lines) < 60, f"{len(lines)} lines during the flood:\n" + "\n".join(lines[:40])
    assert not any("Traceback" in line for line in lines), "\n".join(lines[:40])
    assert {sup.status()[n]["state"] for n in names} == {"running"}


def test_an_accept_storm_on_the_ipc_socket_is_one_line_then_a_count(sup):
    """The supervisor's own listeners, not only the embedded control's port: with its
    descriptors gone (a soft RLIMIT_NOFILE of 64, and local clients that each hold an
    IPC connection open), asyncio fails accept() about 100 times per loop turn, each a
    traceback, until the supervisor prints one line and later a count."""
    import socket

    from supervisor import paths
    with soft_nofile(64):
        sup.start()
    path = str(paths.supervisor_socket(sup.data_dir))
    quiet_before = len(sup.text().splitlines())
    socks: list[socket.socket] = []
    try:
        for _ in range(200):  # beyond what 64 descriptors hold, and beyond the backlog
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(0.2)
            with contextlib.suppress(OSError):
                s.connect(path)
            socks.append(s)
        wait_for(lambda: "failed: [Errno 24] Too many open files" in sup.text(), 30,
                 "one line for the failed accepts")
        wait_for(lambda: " more in the last 10 s" in sup.text(), 30, "the count of the others")
    finally:
        for s in socks:
            s.close()
    wait_for(sup._answers, 30, "the supervisor to answer again")
    lines = sup.text().splitlines()[quiet_before:]
    storm = [line for line in lines if "accept" in line]
    assert storm and all(line.startswith("ts-supervisor: warning: accept on ") for line in storm), lines[:20]
    assert len(storm) < 6 and not any("Traceback" in line for line in lines), "\n".join(lines[:40])
