"""Process handling on plain OS processes (no tailscale involved): stop escalates
TERM -> KILL and takes the whole group; orphans are recognised only by proof."""
import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import psutil

from supervisor import procs

STUBBORN = [sys.executable, "-c",
            "import signal, subprocess, sys, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(100)'])\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(100)\n"]


def test_stop_escalates_to_kill_and_sweeps_the_group():
    async def main():
        child = await procs.spawn("stubborn", STUBBORN, dict(os.environ))
        grandchild = int((await child.proc.stdout.readline()).decode())
        t0 = time.monotonic()
        rc = await procs.stop(child, grace=0.3)
        return rc, grandchild, time.monotonic() - t0
    rc, grandchild, took = asyncio.run(main())
    assert rc == -signal.SIGKILL
    assert not psutil.pid_exists(grandchild) or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
    assert took < 5


def test_stop_of_a_polite_child_uses_term(tmp_path):
    async def main():
        child = await procs.spawn("sleep", ["sleep", "100"], dict(os.environ), pidfile=tmp_path / "p.pid")
        assert json.loads((tmp_path / "p.pid").read_text())["pid"] == child.pid
        return await procs.stop(child, grace=5)
    assert asyncio.run(main()) == -signal.SIGTERM
    assert not (tmp_path / "p.pid").exists()


def test_orphans_need_matching_pid_create_time_and_argv(tmp_path):
    p = subprocess.Popen(["sleep", "100"], start_new_session=True)
    try:
        ct = psutil.Process(p.pid).create_time()
        good = tmp_path / "good.pid"
        procs.write_pidfile(good, p.pid, ct, ["sleep", "100"])
        wrong_time = tmp_path / "wrong_time.pid"
        procs.write_pidfile(wrong_time, p.pid, ct - 10, ["sleep", "100"])
        wrong_argv = tmp_path / "wrong_argv.pid"
        procs.write_pidfile(wrong_argv, p.pid, ct, ["sleep", "999"])
        garbage = tmp_path / "garbage.pid"
        garbage.write_text("not json")
        found = procs.find_orphans(sorted(tmp_path.glob("*.pid")))
        assert [path.name for path, _ in found] == ["good.pid"]
        assert p.poll() is None  # finding kills nothing
        assert not wrong_time.exists() and not wrong_argv.exists() and not garbage.exists()
        killed = procs.kill_orphans([good])
        assert len(killed) == 1 and str(p.pid) in killed[0]
        p.wait(5)  # kill_orphans may already have reaped it (it is our child here)
        assert not psutil.pid_exists(p.pid)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_parent_death_pipe_is_not_inherited_by_default():
    pipe = procs.ParentDeathPipe()
    try:
        assert not os.get_inheritable(pipe.read_fd) and not os.get_inheritable(pipe.write_fd)
    finally:
        pipe.close()
