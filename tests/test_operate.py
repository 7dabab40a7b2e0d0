"""Operator commands against a running supervisor with real proxies: start,
stop, restart, logs, events, add and remove; and the socket refusing others."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

import psutil
import pytest

from tests.harness import wait_for
from tests.unit.test_ipc import raw_unix
from tests.supervisor_harness import SupervisorProc
from tests.test_supervisor import run_proxy

pytestmark = pytest.mark.real


def cli(sup: SupervisorProc, *args: str) -> subprocess.CompletedProcess:
    return sup.cli(*args, "--data-dir", str(sup.data_dir))


def test_stop_start_restart_by_name(sup, control, tmp_path):
    run_proxy(sup, control, tmp_path, "app", reusable=True)
    pid = sup.status()["app"]["pid"]

    out = cli(sup, "stop", "app")
    assert out.returncode == 0, out.stderr
    wait_for(lambda: sup.status()["app"]["state"] == "stopped", 15, "stopped")
    assert sup.status()["app"]["pid"] is None and not psutil.pid_exists(pid)

    assert cli(sup, "start", "app").returncode == 0
    wait_for(lambda: sup.status()["app"]["state"] == "running", 30, "running again")
    pid2 = sup.status()["app"]["pid"]
    assert "already running" in cli(sup, "start", "app").stdout

    n = len(sup.events())
    assert cli(sup, "restart", "app").returncode == 0
    sup.wait_state("app", "running", 30, after=n)
    assert sup.status()["app"]["pid"] not in (pid2, None)
    assert sup.status()["app"]["recoveries"] == 0  # a restart touches no state

    bad = cli(sup, "stop", "nosuch")
    assert bad.returncode == 1 and "no proxy named 'nosuch'" in bad.stderr


def test_start_gives_a_failed_proxy_a_new_chance(sup, control, tmp_path):
    key = run_proxy(sup, control, tmp_path, "app", reusable=True)
    control.admin("revoke_key", id=key["id"])
    control.admin("delete_node", id=control.node_named("app")["id"])
    sup.wait_state("app", "failed", 30)
    (tmp_path / "app.secret").write_text(control.create_key(reusable=True)["secret"])
    n = len(sup.events())
    assert cli(sup, "start", "app").returncode == 0
    sup.wait_state("app", "running", 30, after=n)


def test_commands_without_a_supervisor_exit_3(tmp_path):
    s = SupervisorProc(tmp_path / "conf.d", tmp_path / "nothing")
    out = s.cli("restart", "app", "--data-dir", str(tmp_path / "nothing"))
    assert out.returncode == 3 and "no ts-supervisor is running" in out.stderr


def test_logs_and_events_show_a_proxy_without_secrets(sup, control, tmp_path):
    key = run_proxy(sup, control, tmp_path, "app", reusable=True)
    logs = cli(sup, "logs", "app", "-n", "500")
    assert logs.returncode == 0 and "Switching ipn state" in logs.stdout
    assert key["secret"] not in logs.stdout
    events = cli(sup, "events", "app")
    assert events.returncode == 0
    lines = events.stdout.splitlines()
    assert any(" app: booted, now starting" in l for l in lines)
    assert any(" app: running: 100.64." in l for l in lines)
    assert cli(sup, "logs", "nosuch").returncode == 1


def test_add_and_remove_round_trip_through_check_and_the_running_supervisor(sup, control, tmp_path):
    run_proxy(sup, control, tmp_path, "app", reusable=True)
    conf = str(sup.config_dir)
    added = cli(sup, "add", "web", "--target", "http://127.0.0.1:9", "--login-server", "embedded",
                "--config-dir", conf)
    assert added.returncode == 0, added.stderr
    assert sup.cli("check", "--config-dir", conf).returncode == 0
    sup.wait_state("web", "running", 30)

    again = cli(sup, "add", "web", "--target", "http://127.0.0.1:9", "--config-dir", conf)
    assert again.returncode == 1 and "already exists" in again.stderr
    dup = cli(sup, "add", "web2", "--hostname", "app", "--target", "http://127.0.0.1:9",
              "--login-server", "embedded", "--config-dir", conf)
    assert dup.returncode == 1 and "hostname" in dup.stderr and "app.toml" in dup.stderr
    bad = cli(sup, "add", "bad", "--target", "ftp://x", "--config-dir", conf)
    assert bad.returncode == 1 and "target" in bad.stderr
    assert not (sup.config_dir / "web2.toml").exists() and not (sup.config_dir / "bad.toml").exists()

    removed = cli(sup, "remove", "web", "--config-dir", conf)
    assert removed.returncode == 0
    wait_for(lambda: "web" not in sup.status(), 15, "web gone")
    assert sup.cli("check", "--config-dir", conf).returncode == 0
    assert cli(sup, "remove", "web", "--config-dir", conf).returncode == 1


def test_socket_refuses_another_user(sup, control, tmp_path):
    """Root passes every mode check, so drop to nobody with setpriv. Even with the
    data dir opened up for traversal, the 0600 socket refuses the connection."""
    run_proxy(sup, control, tmp_path, "app", reusable=True)
    os.chmod(sup.data_dir, 0o755)
    os.chmod(tmp_path, 0o755)
    probe = ("import socket, sys\n"
             "s = socket.socket(socket.AF_UNIX)\n"
             "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(13)\n"
             "s.sendall(b'{\"cmd\": \"stop\", \"name\": \"app\"}\\n')\nprint(s.recv(999))\n")
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                          "/usr/bin/python3", "-c", probe, str(sup.data_dir / "supervisor.sock")],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 13, (out.stdout, out.stderr)
    assert sup.status()["app"]["state"] == "running"


def test_recover_forces_one_wipe_and_a_fresh_login(sup, control, tmp_path):
    run_proxy(sup, control, tmp_path, "app", reusable=True)
    n = len(sup.events())
    out = cli(sup, "recover", "app")
    assert out.returncode == 0, out.stderr
    sup.wait_state("app", "recovering", 10, after=n)
    sup.wait_state("app", "running", 30, after=n)
    assert [e["event"] for e in sup.events()[n:] if e["event"] == "wiped"] == ["wiped"]
    assert sup.status()["app"]["recoveries"] == 1


def test_events_follow_shows_new_transitions_as_they_happen(sup, control, tmp_path):
    run_proxy(sup, control, tmp_path, "app", reusable=True)
    follower = subprocess.Popen([sys.executable, "-m", "supervisor", "events", "app", "-f", "-n", "0",
                                 "--data-dir", str(sup.data_dir)], stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(follower.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        assert cli(sup, "restart", "app").returncode == 0
        wait_for(lambda: any(" app: started, now starting" in l for l in lines), 15, "the restart, live")
        wait_for(lambda: any(" app: running: " in l for l in lines), 30, "running again, live")
    finally:
        follower.terminate()
        follower.wait(10)


def test_hostile_socket_clients_cost_one_connection_each(sup, control, tmp_path):
    """Oversize, undecodable, odd and silent requests against the real supervisor:
    each gets one error line (or a close); the proxy keeps its pid, nothing is logged."""
    run_proxy(sup, control, tmp_path, "app", reusable=True)
    pid = sup.status()["app"]["pid"]
    path = str(sup.data_dir / "supervisor.sock")

    def send(data: bytes, half_close: bool = True) -> bytes:
        return raw_unix(path, data, half_close, timeout=20)

    for data, error in ((b"x" * (2 << 20) + b"\n", "request is over 64 KiB"),
                        (b"\xff\xfe\n", "request is not a JSON line"),
                        (b"[" * 50000 + b"\n", "request is not a JSON line"),
                        (b"[]\n", "request must be a JSON object"),
                        (b'{"cmd": 1}\n', "unknown command 1"),
                        (b'{"cmd": "stop", "name": ["app"]}\n', "no proxy named"),
                        (b'{"cmd": "stop", "name": {"x": null}}\n', "no proxy named")):
        answer = json.loads(send(data))
        assert answer["ok"] is False and answer["error"].startswith(error), (data[:40], answer)
    assert send(b"") == b""
    with socket.socket(socket.AF_UNIX) as s:  # a client that connects, says half a word, and leaves
        s.connect(path)
        s.sendall(b'{"cmd": "st')
    assert sup.status()["app"]["pid"] == pid and sup.status()["app"]["state"] == "running"
    big = cli(sup, "stop", "x" * 70000)
    assert big.returncode == 2 and big.stderr.count("\n") == 1
    assert "Traceback" not in sup.text() and "exception" not in sup.text().lower()


NOBODY = 65534  # uid, and gid nogroup: the service user here


@pytest.mark.parametrize("dir_mode, group, want", [
    (0o755, 0, 0o644),          # root's conf.d, open to all (the README's layout)
    (0o750, NOBODY, 0o640),     # root:SERVICE-GROUP 0750: only the service's group may read
    (None, 0, 0o644),           # no conf.d yet: add makes it 0755
], ids=["root-0755", "group-0750", "new-dir"])
def test_add_as_root_under_umask_077_writes_a_file_the_service_user_reads(dir_mode, group, want):
    """The unit runs the service as its own user, but the operator runs `add` as root
    (sudo, often under umask 077): the new file must still be readable by the service."""
    import shutil
    import stat
    import tempfile
    from pathlib import Path

    from tests.supervisor_harness import ROOT
    base = Path(tempfile.mkdtemp(prefix="ts-sup-add-"))  # in /tmp: uid 65534 can reach it
    try:
        base.chmod(0o755)
        conf = base / "conf.d"
        if dir_mode is not None:
            conf.mkdir()
            os.chown(conf, 0, group)
            conf.chmod(dir_mode)
        out = subprocess.run([sys.executable, "-m", "supervisor", "add", "web", "--target",
                              "http://127.0.0.1:8080", "--login-server", "embedded",
                              "--config-dir", str(conf), "--data-dir", str(base / "data")],
                             cwd=ROOT, capture_output=True, text=True, timeout=60,
                             preexec_fn=lambda: os.umask(0o077))
        assert out.returncode == 0, out.stderr
        st = (conf / "web.toml").stat()
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (want, group)
        assert stat.S_IMODE(conf.stat().st_mode) == (dir_mode or 0o755)
        read = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                               "--", "cat", str(conf / "web.toml")], capture_output=True, text=True)
        assert read.returncode == 0 and 'hostname = "web"' in read.stdout, read.stderr
    finally:
        shutil.rmtree(base)
