"""The supervisor's control socket: 0600, one JSON line each way, clear errors.
Any bytes a client sends cost that one connection; the server keeps serving."""
import asyncio
import json
import logging
import os
import socket
import stat
import threading
from collections.abc import Iterator

import pytest

from supervisor import ipc

LIMIT = 64 << 10         # the request size the server takes (ipc.MAX_REQUEST)
ANSWER_LIMIT = 16 << 20  # the answer size the client takes (ipc.MAX_ANSWER)


class Running:
    """An IPCServer on its own loop in a thread, with a status and a failing handler."""

    def __init__(self, data_dir):
        async def status(req):
            return {"ok": True, "echo": req}

        async def broken(req):
            return {"ok": True, "name": req["name"].upper()}  # KeyError/AttributeError on odd args

        self.loop = asyncio.new_event_loop()
        self.server = ipc.IPCServer(data_dir, {"status": status, "broken": broken})
        self.server.request_timeout = 0.5
        ready = threading.Event()

        def serve():
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.server.start())
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        assert ready.wait(5)
        self.path = str(self.server.path)

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def raw(self, data: bytes, close_write: bool = True) -> bytes:
        return raw_unix(self.path, data, close_write)


@pytest.fixture
def server(tmp_path, caplog) -> Iterator[Running]:
    caplog.set_level(logging.DEBUG)
    r = Running(tmp_path)
    yield r
    r.stop()
    # nothing a client sent may reach the log as a traceback (asyncio logs a
    # client_connected_cb that raised)
    logged = [f"{rec.levelname}: {rec.getMessage()}"[:200] for rec in caplog.records
              if rec.levelno >= logging.WARNING]
    assert logged == []


def test_status_round_trip_and_socket_mode(tmp_path, server):
    mode = stat.S_IMODE(os.stat(tmp_path / ipc.SOCKET_NAME).st_mode)
    assert mode == 0o600
    assert ipc.call(tmp_path, "status", x=1) == {"ok": True, "echo": {"cmd": "status", "x": 1}}
    assert ipc.call(tmp_path, "nope")["error"].startswith("unknown command 'nope'")


def test_not_running_is_a_clear_error(tmp_path):
    with pytest.raises(ipc.NotRunning, match="no ts-supervisor is running"):
        ipc.call(tmp_path, "status")


@pytest.mark.parametrize("size", [LIMIT + 1, 1 << 20, 2 << 20])
def test_an_oversize_request_gets_one_error_line_and_the_server_serves_on(tmp_path, server, size):
    answer = ipc.call(tmp_path, "status", blob="x" * size)
    assert answer == {"ok": False, "error": "request is over 64 KiB"}
    assert ipc.call(tmp_path, "status")["ok"] is True


def test_a_request_just_under_the_limit_is_served(tmp_path, server):
    blob = "x" * (LIMIT - 100)
    assert ipc.call(tmp_path, "status", blob=blob)["echo"]["blob"] == blob


@pytest.mark.parametrize("data,error", [
    (b"\xff\xfe\x00garbage\n", "request is not a JSON line"),
    (b"not json\n", "request is not a JSON line"),
    (b"\n", "request is not a JSON line"),
    (b"[" * 60000 + b"\n", "request is not a JSON line"),          # deeper than json can go
    (b'{"cmd": "status"' + b" " * 70000 + b"}\n", "request is over 64 KiB"),
    (b"[1, 2]\n", "request must be a JSON object"),
    (b'"status"\n', "request must be a JSON object"),
    (b"null\n", "request must be a JSON object"),
    (b'{"cmd": 7}\n', "unknown command 7"),
    (b'{"cmd": ["status"]}\n', "unknown command ['status']"),
    (b'{"cmd": {"a": 1}}\n', "unknown command {'a': 1}"),
    (b'{"x": 1}\n', "unknown command None"),
    (b'{"cmd": "' + b"a" * 5000 + b'"}\n', "unknown command 'aaaa"),
    (b'{"cmd": "broken"}\n', "broken failed: KeyError"),
    (b'{"cmd": "broken", "name": 5}\n', "broken failed: AttributeError"),
    (b'{"cmd": "status", "n": 1' + b"0" * 5000 + b"}\n", "request is not a JSON line"),  # int too long
])
def test_bad_requests_cost_one_connection_with_one_error_line(tmp_path, server, data, error):
    out = server.raw(data)
    assert out.count(b"\n") == 1 and out.endswith(b"\n")
    answer = json.loads(out)
    assert answer["ok"] is False and answer["error"].startswith(error)
    assert len(answer["error"]) < 200
    assert ipc.call(tmp_path, "status")["ok"] is True


def test_a_request_without_its_newline_is_still_served(server):
    assert json.loads(server.raw(b'{"cmd": "status"}'))["ok"] is True


@pytest.mark.parametrize("data", [b"", b'{"cmd": "sta'])
def test_a_client_that_hangs_gets_a_timeout_line(tmp_path, server, data):
    out = server.raw(data, close_write=False)  # neither a newline nor an EOF: request_timeout ends it
    assert json.loads(out) == {"ok": False, "error": "no request line within 0.5 s"}
    assert ipc.call(tmp_path, "status")["ok"] is True


def test_clients_that_leave_early_cost_nothing(tmp_path, server):
    for data in (b"", b'{"cmd": "sta', b"x" * (3 << 20)):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(server.path)
            try:
                s.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                pass
        # closed at once, mid-line or with the server's answer unread
    assert ipc.call(tmp_path, "status")["ok"] is True


def raw_unix(path: str, data: bytes, close_write: bool = True, timeout: float = 5) -> bytes:
    """Send raw bytes to a unix socket; what the server sent back before closing."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(path)
        try:
            s.sendall(data)
            if close_write:
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:  # closed with our excess unread: what came before it counts
            pass
        return out


class FakeSupervisor:
    """A socket that answers every request with fixed bytes, then closes (or hangs)."""

    def __init__(self, data_dir, answer: bytes | None):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(data_dir / ipc.SOCKET_NAME))
        self.sock.listen()
        self.answer = answer
        self.stop = threading.Event()
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        try:
            conn, _ = self.sock.accept()
        except OSError:  # closed before a client came
            return
        with conn:
            conn.recv(65536)
            if self.answer is None:
                self.stop.wait(10)
                return
            try:
                conn.sendall(self.answer)
            except OSError:
                pass


@pytest.mark.parametrize("answer,error", [
    (b"", "the supervisor closed the connection without an answer"),
    (b"\n", "the supervisor closed the connection without an answer"),
    (b"garbage\n", "the supervisor's answer is not JSON"),
    (b"\xff\xfe\n", "the supervisor's answer is not JSON"),
    (b'{"ok": tr', "the supervisor's answer is not JSON"),
    (b"[" * 100000 + b"\n", "the supervisor's answer is not JSON"),
    (b"[1]\n", "the supervisor's answer is not a JSON object"),
    (b"x" * (ANSWER_LIMIT + 70000), "the supervisor's answer is over 16 MiB"),
    (None, "no answer from the supervisor within 0.3 s"),
])
def test_the_client_turns_a_bad_answer_into_one_clear_error(tmp_path, answer, error):
    fake = FakeSupervisor(tmp_path, answer)
    try:
        with pytest.raises(ipc.IPCError) as e:
            ipc.call(tmp_path, "status", timeout=0.3 if answer is None else 10)
        assert str(e.value) == error
    finally:
        fake.stop.set()
        fake.sock.close()


def test_every_server_answers_process_with_its_own_tasks_and_fds(tmp_path, server):
    """What scripts/soak samples: the serving process's asyncio tasks and open fds."""
    answer = ipc.call(tmp_path, "process")
    assert answer["ok"] is True and answer["pid"] == os.getpid()  # the server runs in this process
    assert answer["tasks"] >= 1  # at least the task answering
    assert isinstance(answer["fds"], int) and answer["fds"] >= 3  # stdin, stdout, stderr at least


# -- a CLI in another environment or as another user finds the socket ----------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")


@pytest.fixture
def short_xdg(monkeypatch):
    """A short XDG_RUNTIME_DIR of this user, set for what starts now."""
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix="xdg-", dir="/tmp")
    monkeypatch.setenv("XDG_RUNTIME_DIR", d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def long_data_dir(tmp_path):
    d = tmp_path / ("d" * max(1, 110 - len(str(tmp_path))))
    d.mkdir()
    return d


def test_a_cli_whose_runtime_dir_differs_finds_the_socket_the_supervisor_recorded(
        tmp_path, short_xdg, monkeypatch):
    """A data dir too long for a socket address puts the socket in a runtime dir that
    depends on the user and environment: the service's (here: its XDG_RUNTIME_DIR) is
    not the one root's `status` computes (/run/ts-supervisor-H)."""
    data = long_data_dir(tmp_path)
    r = Running(data)
    try:
        assert str(ipc.socket_for(data)).startswith(short_xdg + "/")
        with monkeypatch.context() as m:
            m.delenv("XDG_RUNTIME_DIR")  # another environment: another runtime dir
            assert ipc.call(data, "status")["ok"] is True
    finally:
        r.stop()
    assert not (data / ipc.RECORD_NAME).exists()  # gone with the socket


@needs_root
def test_a_recorded_socket_of_another_user_is_not_followed(tmp_path, short_xdg, monkeypatch):
    data = long_data_dir(tmp_path)
    r = Running(data)
    try:
        recorded = ipc.socket_for(data)
        os.chown(recorded, 65534, 65534)  # not the data dir's owner
        with monkeypatch.context() as m:
            m.delenv("XDG_RUNTIME_DIR")
            assert ipc.socket_for(data) != recorded
            with pytest.raises(ipc.NotRunning):
                ipc.call(data, "status")
    finally:
        r.stop()


@needs_root
def test_an_xdg_runtime_dir_of_another_user_is_not_used(tmp_path, short_xdg):
    """setpriv and su keep root's environment: the service user cannot use root's
    XDG_RUNTIME_DIR, and failed to start its IPC socket there."""
    from supervisor import paths
    os.chown(short_xdg, 65534, 65534)
    assert not paths.runtime_dir(tmp_path).is_relative_to(short_xdg)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid (setpriv)")
def test_another_uid_is_refused_whatever_the_modes_say(caplog):
    """On a NAS share whose ACLs show 0777 everywhere the data dir's and the socket's
    modes keep no one out: the server itself serves only its own user and root (by
    SO_PEERCRED), as the control's admin socket does. Before, uid 65534 could stop,
    restart and recover proxies through a reachable supervisor.sock."""
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path
    top = Path(tempfile.mkdtemp(prefix="ts-ipc-"))  # tmp_path is 0700: 65534 cannot reach it
    r = Running(top)
    try:
        top.chmod(0o777)
        (top / ipc.SOCKET_NAME).chmod(0o666)
        client = ("import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
                  "s.sendall(b'{\"cmd\": \"status\"}\\n'); print(s.makefile().readline(), end='')")
        out = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                              sys.executable, "-c", client, str(top / ipc.SOCKET_NAME)],
                             capture_output=True, text=True, timeout=30)
        assert json.loads(out.stdout) == {"ok": False, "error": "uid 65534 may not use this "
                                          "supervisor (only its own user and root)"}, out.stderr
        assert ipc.call(top, "status")["ok"] is True  # its own user still is served
    finally:
        r.stop()
        shutil.rmtree(top)
