"""The control's admin API lives on a 0600 unix socket, and the CLI talks only to a
control it has proven live: a port or socket taken over by someone else after a
`kill -9` never hears a request. Loopback only, no tailscaled, no namespace needed;
the other-uid cases run a stdlib-only python3 as uid 65534 (setpriv, so root only)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from supervisor.cli import main
from supervisor.control.cli import AdminClient
from supervisor.control.server import ControlServer, admin_socket_path
from tests.control.ts2021_client import http1
from tests.harness import wait_for

ROOT = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"  # stdlib only, reachable by uid 65534 (the venv is under /root)
as_nobody = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv")
                               or not os.path.exists(SYSTEM_PYTHON),
                               reason="needs root, setpriv and /usr/bin/python3 to act as uid 65534")
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", SYSTEM_PYTHON, "-c"]


def run(control_dir: Path, body: Callable[[ControlServer], object], **opts) -> None:
    async def go() -> None:
        srv = ControlServer(control_dir, **opts)
        await srv.start()
        try:
            async with asyncio.timeout(30):
                await body(srv)  # type: ignore[misc]
        finally:
            await srv.stop()
    asyncio.run(go())


# -- where the admin API is ------------------------------------------------------------------


def test_the_tcp_port_answers_admin_with_404_whatever_the_credentials(tmp_path: Path) -> None:
    async def body(srv: ControlServer) -> None:
        for headers in ({}, {"Authorization": "Bearer anything"}):
            assert (await http1(srv.url, "GET", "/admin/nodes", b"", headers))[0] == 404
            assert (await http1(srv.url, "POST", "/admin/keys", b"{}", headers))[0] == 404
            assert (await http1(srv.url, "POST", "/admin/fault", b'{"status": 500}', headers))[0] == 404
        assert srv.admin("list_keys") == [] and srv.fault_status is None
        status, raw = await http1(f"unix:{admin_socket_path(srv.data_dir)}", "GET", "/admin/control")
        assert status == 200 and json.loads(raw) == {"url": srv.url, "public_key": srv.public_key,
                                                     "pid": os.getpid()}
    run(tmp_path / "control", body)


def test_the_admin_socket_is_0600_in_a_0700_dir_and_no_token_is_kept(tmp_path: Path) -> None:
    """No bearer token any more: the kernel-checked peer uid is the credential, so there
    is no secret to leak or rotate, and an earlier release's `admin-token` is removed."""
    cdir = tmp_path / "control"
    cdir.mkdir(mode=0o755)
    (cdir / "admin-token").write_text("an-old-token\n")

    async def body(srv: ControlServer) -> None:
        st = os.lstat(cdir / "admin.sock")
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert stat.S_IMODE(os.stat(cdir).st_mode) == 0o700
        assert not (cdir / "admin-token").exists()
        assert stat.S_IMODE(os.stat(cdir / "endpoint.json").st_mode) == 0o600
        endpoint = json.loads((cdir / "endpoint.json").read_text())
        assert endpoint["pid"] == os.getpid() and endpoint["public_key"] == srv.public_key
        assert "token" not in json.dumps(endpoint).lower()
    run(cdir, body)
    assert not (cdir / "admin.sock").exists() and not (cdir / "endpoint.json").exists()


def test_a_control_dir_too_long_for_a_socket_address_still_gets_its_admin_socket(tmp_path: Path) -> None:
    cdir = tmp_path / ("c" * (110 - len(str(tmp_path))))

    async def body(srv: ControlServer) -> None:
        path = admin_socket_path(cdir)
        assert path.parent != cdir and stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        client = await asyncio.to_thread(AdminClient.from_data_dir, cdir)
        assert client.url == srv.url
        assert await asyncio.to_thread(client.nodes) == []
    run(cdir, body)


def test_a_cli_in_another_environment_finds_the_admin_socket_the_control_recorded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runtime dir of a too-long control dir depends on the user and environment
    (here the control's XDG_RUNTIME_DIR): root's `ts-supervisor control ...` computes
    another one, so it follows endpoint.json's admin_socket, once its peer is the pid."""
    cdir = tmp_path / ("c" * (110 - len(str(tmp_path))))
    xdg = tempfile.mkdtemp(prefix="xdg-", dir="/tmp")
    monkeypatch.setenv("XDG_RUNTIME_DIR", xdg)

    async def body(srv: ControlServer) -> None:
        assert str(admin_socket_path(cdir)).startswith(xdg + "/")
        with monkeypatch.context() as m:
            m.delenv("XDG_RUNTIME_DIR")
            client = await asyncio.to_thread(AdminClient.from_data_dir, cdir)
        assert client.url == srv.url and str(client.socket_path).startswith(xdg + "/")
    try:
        run(cdir, body)
    finally:
        shutil.rmtree(xdg, ignore_errors=True)


def test_a_second_control_on_the_same_dir_is_refused_in_one_line(tmp_path: Path) -> None:
    async def body(srv: ControlServer) -> None:
        other = ControlServer(srv.data_dir)
        with pytest.raises(OSError) as e:
            await other.start()
        assert "another control serves" in str(e.value) and "\n" not in str(e.value)
        await other.stop()
        cli = await asyncio.to_thread(  # `control serve` says so in one line (it was a traceback)
            subprocess.run, [sys.executable, "-m", "supervisor", "control", "--control-dir",
                             str(srv.data_dir), "serve"], cwd=ROOT, capture_output=True, text=True,
            timeout=60)
        assert cli.returncode == 1 and cli.stdout == "", cli.stderr
        assert cli.stderr.startswith("ts-supervisor control: error: another control serves") \
            and cli.stderr.count("\n") == 1, cli.stderr
        assert await asyncio.to_thread(lambda: AdminClient.from_data_dir(srv.data_dir).nodes()) == []
    run(tmp_path / "control", body)


@contextlib.contextmanager
def world_traversable_dir() -> Iterator[Path]:
    """pytest's tmp_path is 0700 root: uid 65534 could not even reach a socket there."""
    d = Path(tempfile.mkdtemp(prefix="ts-admin-", dir="/tmp"))
    try:
        d.chmod(0o755)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


ASK_AS_NOBODY = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
s.sendall(b"POST /admin/keys HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 2\\r\\n\\r\\n{}")
print(s.recv(4096).decode().split("\\r\\n")[0])
"""


@as_nobody
def test_another_uid_is_refused_even_where_modes_would_let_it_in() -> None:
    """On a NAS volume whose ACLs make every mode 0777, the socket's mode protects
    nothing; the peer uid the kernel reports still does."""
    with world_traversable_dir() as d:
        cdir = d / "control"

        async def body(srv: ControlServer) -> None:
            cdir.chmod(0o755)
            os.chmod(cdir / "admin.sock", 0o666)  # what a permissive ACL amounts to
            out = await asyncio.to_thread(subprocess.run, [*NOBODY, ASK_AS_NOBODY, str(cdir / "admin.sock")],
                                          capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            assert out.stdout.strip() == "HTTP/1.1 403 Forbidden"
            assert srv.admin("list_keys") == []
            refused = [e for e in srv.admin("events") if e["kind"] == "admin_refused"]
            assert len(refused) == 1 and "uid 65534" in refused[0]["reason"], srv.admin("events")
        run(cdir, body)


# -- a stale endpoint.json, and squatters ---------------------------------------------------

SQUAT_AS_NOBODY = """
import json, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(16)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    c.settimeout(3)
    data = b""
    try:
        while b"\\r\\n\\r\\n" not in data and (chunk := c.recv(65536)):
            data += chunk
    except OSError:
        pass
    print(json.dumps({"heard": data.decode("latin-1")}), flush=True)
    c.close()
"""


@contextlib.contextmanager
def squatter_on(port: int) -> Iterator[Callable[[], list[str]]]:
    """uid 65534 listening on 127.0.0.1:PORT; yields a function giving what it heard,
    one entry per connection (after it is stopped). It closes each connection once a
    request head has come (or after 3 s of silence), answering nothing."""
    proc = subprocess.Popen([*NOBODY, SQUAT_AS_NOBODY, str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    heard: list[str] = []
    try:
        first = proc.stdout.readline()  # type: ignore[union-attr]
        assert first.strip() == "listening", proc.stderr.read()  # type: ignore[union-attr]
        yield lambda: heard
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
        heard.extend(json.loads(line)["heard"] for line in out.splitlines() if line.strip())


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


@as_nobody
def test_after_a_kill_9_a_squatter_on_the_old_port_hears_nothing(tmp_path: Path) -> None:
    """The control dies without cleaning up; another user binds its old port. Every
    admin command refuses the stale endpoint.json in one line and sends nothing."""
    cdir = tmp_path / "control"
    proc = subprocess.Popen([sys.executable, "-m", "supervisor", "control", "--control-dir", str(cdir),
                             "serve"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (cdir / "endpoint.json").exists() and cli(
            "control", "--control-dir", str(cdir), "nodes", "list").returncode == 0, 30,
            "the standalone control to answer")
        port = int(json.loads((cdir / "endpoint.json").read_text())["url"].rsplit(":", 1)[1])
    finally:
        proc.kill()  # kill -9: endpoint.json and the socket file stay behind
        proc.wait(10)
    assert (cdir / "endpoint.json").exists()

    with squatter_on(port) as heard:
        outs = [cli("control", "--control-dir", str(cdir), *argv) for argv in
                (["keys", "create"], ["nodes", "list"], ["fault", "--status", "500"], ["caps", "list"])]
    for out in outs:
        assert out.returncode == 1 and out.stdout == "", out
        assert out.stderr.count("\n") == 1 and "stale" in out.stderr and "not running" in out.stderr, out.stderr
    assert heard() == []  # not a connection, let alone a request


def test_a_socket_not_served_by_the_named_pid_hears_nothing(tmp_path: Path) -> None:
    """endpoint.json names a live process (pid reused, say), but whoever answers on the
    admin socket is not it: the connection is closed before a byte is written."""
    cdir = tmp_path / "control"
    cdir.mkdir(mode=0o700)
    sleeper = subprocess.Popen(["sleep", "60"])
    listener = socket.socket(socket.AF_UNIX)
    heard: list[bytes] = []
    try:
        (cdir / "endpoint.json").write_text(json.dumps({
            "url": "http://127.0.0.1:9", "pid": sleeper.pid,
            "create_time": psutil.Process(sleeper.pid).create_time(), "public_key": "mkey:" + "00" * 32}))
        listener.bind(str(admin_socket_path(cdir)))
        listener.listen(4)

        def accept() -> None:
            conn, _ = listener.accept()
            conn.settimeout(5)
            with conn:
                data = b""
                with contextlib.suppress(OSError):
                    while chunk := conn.recv(4096):
                        data += chunk
                heard.append(data)
        t = threading.Thread(target=accept, daemon=True)
        t.start()
        with pytest.raises(ConnectionError) as e:
            AdminClient.from_data_dir(cdir)
        assert f"not by the control (pid {sleeper.pid})" in str(e.value) and "nothing was sent" in str(e.value)
        t.join(10)
        assert heard == [b""]
    finally:
        listener.close()
        sleeper.kill()
        sleeper.wait(5)


def test_a_missing_or_garbled_endpoint_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cdir = tmp_path / "control"
    cdir.mkdir()
    assert main(["control", "--control-dir", str(cdir), "nodes", "list"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "endpoint.json missing" in err
    (cdir / "endpoint.json").write_text('{"url": "http://127.0.0.1:1"}')
    assert main(["control", "--control-dir", str(cdir), "nodes", "list"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "endpoint.json unreadable" in err


# -- the port used last time is taken ------------------------------------------------------


def test_a_control_whose_old_port_is_taken_says_so_in_one_line(tmp_path: Path) -> None:
    cdir = tmp_path / "control"
    first: dict[str, int] = {}

    async def note_port(srv: ControlServer) -> None:
        first["port"] = srv.port
        assert srv.port_moved == ""
    run(cdir, note_port)
    old = first["port"]

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", old))
        taken.listen(1)

        async def moved(srv: ControlServer) -> None:
            assert srv.port != old
            assert srv.port_moved == (
                f"control port {old} is held by another process; listening on {srv.url} instead: "
                f"nodes configured with http://127.0.0.1:{old} must be re-pointed (the supervisor's "
                f"embedded proxies re-register by themselves)")
            assert [e["reason"] for e in srv.admin("events") if e["kind"] == "control_port_changed"] \
                == [srv.port_moved]
            first["port"] = srv.port  # now the control's last port
        run(cdir, moved)

    with socket.socket() as taken:  # and `control serve` says so too, on stderr
        old = first["port"]
        taken.bind(("127.0.0.1", old))
        taken.listen(1)
        proc = subprocess.Popen([sys.executable, "-m", "supervisor", "control", "--control-dir",
                                 str(cdir), "serve"], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()  # type: ignore[union-attr]  # printed once it serves
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=10)
        assert line.startswith("control listening on")
        lines = [x for x in err.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"ts-supervisor control: control port {old} is held"), err
