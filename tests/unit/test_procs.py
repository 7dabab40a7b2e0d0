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


def _started(argv: list[str]) -> subprocess.Popen:
    """A process whose argv is already readable (vfork: the parent may run before exec settles)."""
    p = subprocess.Popen(argv, start_new_session=True)
    deadline = time.monotonic() + 5
    while psutil.Process(p.pid).cmdline() != argv:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    return p


def test_orphans_need_matching_pid_create_time_and_argv(tmp_path):
    p = _started(["sleep", "100"])
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
        assert [o.pidfile.name for o in found] == ["good.pid"]
        for o in found:
            o.close()
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


# -- only processes we started and have not reaped are ever signalled ----------

PID_REUSE = r'''
import asyncio, os, subprocess, sys
from supervisor import procs

async def main():
    # a short-lived child, like `tailscale up`: exits, is reaped, stays in the launch record
    up = await procs.spawn("up", ["true"], dict(os.environ))
    await up.proc.wait()
    # an unrelated group leader takes the very same pid
    for _ in range(50):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(up.pid - 1))
        stranger = subprocess.Popen(["sleep", "100"], start_new_session=True)
        if stranger.pid == up.pid:
            break
        stranger.kill(); stranger.wait()
    else:
        sys.exit("could not make the pid be reused")
    await procs.stop(up, grace=0.5)        # stopping the proxy that owned `up`
    if hasattr(procs, "send_signal"):
        procs.send_signal(up, 9)           # and any later signal to it
    await asyncio.sleep(0.2)
    alive = stranger.poll() is None
    stranger.kill(); stranger.wait()
    print("stranger alive" if alive else f"stranger killed: {stranger.returncode}")

asyncio.run(main())
'''


def test_a_reused_pid_is_never_signalled(tmp_path):
    """The pid of an exited child is taken by an unrelated group leader (made
    deterministic in a private pid namespace with ns_last_pid); stopping the
    child must not touch it (it used to die with status 137)."""
    script = tmp_path / "reuse.py"
    script.write_text(PID_REUSE)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, str(script)],
                         capture_output=True, text=True, timeout=60, cwd=root,
                         env={**os.environ, "PYTHONPATH": root})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "stranger alive"


LEAVES_A_CHILD = [sys.executable, "-c",
                  "import subprocess, sys\n"
                  "child = subprocess.Popen([sys.executable, '-c', 'import signal,time; "
                  "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(100)'])\n"
                  "print(child.pid, flush=True)\n"]


def test_what_an_exited_child_left_behind_is_taken_back_and_stopped():
    """The child exits by itself and leaves a grandchild in its group. The
    grandchild re-parents to us (subreaper) and stop() ends it as our own
    child, not by sweeping a group number."""
    async def main():
        child = await procs.spawn("leaver", LEAVES_A_CHILD, dict(os.environ))
        grandchild = int((await child.proc.stdout.readline()).decode())
        deadline = time.monotonic() + 10
        while psutil.Process(grandchild).ppid() != os.getpid():  # pytest is a subreaper (conftest)
            assert time.monotonic() < deadline, "the grandchild never came back to us"
            await asyncio.sleep(0.01)
        await procs.stop(child, grace=0.3)
        return grandchild
    grandchild = asyncio.run(main())
    assert not psutil.pid_exists(grandchild)


def test_a_child_that_cannot_be_recorded_is_killed_and_reaped(tmp_path):
    """ENOSPC/EACCES on the pidfile after the fork: no child may run untracked."""
    ro = tmp_path / "ro"
    ro.mkdir()
    pidfile = ro / "pids" / "x.pid"
    (ro / "pids").mkdir()
    (ro / "pids").chmod(0o500)

    async def main():
        before = {p.pid for p in psutil.Process().children()}
        try:
            await procs.spawn("sleep", ["sleep", "100"], dict(os.environ), pidfile=pidfile)
        except procs.SpawnError as e:
            after = {p.pid for p in psutil.Process().children()} - before
            return str(e), after
        return "", set()
    if os.geteuid() == 0:
        # root ignores modes: make the write fail the way a full disk does
        (ro / "pids").chmod(0o700)
        pidfile.with_suffix(".tmp").mkdir()  # the temp name is taken by a directory
    why, left = asyncio.run(main())
    assert "cannot record" in why and left == set()


def test_orphans_are_signalled_only_through_a_verified_pidfd(tmp_path):
    """A pidfile naming a live stranger (wrong argv) is dropped; a verified
    orphan gets SIGKILL through its pidfd; neither one's group is swept."""
    mine = _started(["sleep", "101"])
    stranger = _started(["sleep", "102"])
    try:
        procs.write_pidfile(tmp_path / "a.pid", mine.pid, psutil.Process(mine.pid).create_time(),
                            ["sleep", "101"])
        procs.write_pidfile(tmp_path / "b.pid", stranger.pid,
                            psutil.Process(stranger.pid).create_time(), ["sleep", "999"])
        killed = procs.kill_orphans(sorted(tmp_path.glob("*.pid")), grace=5)
        assert killed == [f"pid {mine.pid} (sleep 101)"]
        assert mine.wait(5) == -signal.SIGKILL
        assert stranger.poll() is None
    finally:
        for p in (mine, stranger):
            if p.poll() is None:
                p.kill()
                p.wait()
