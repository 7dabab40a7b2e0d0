"""Process handling: spawn children we own, stop them bottom-up, find the
ones a killed supervisor left behind.

The one rule (trio's: whoever starts a child owns and reaps it): a signal
only ever reaches a process we started and have not yet reaped.

- Every child is held by a pidfd, opened before anything can reap it. A
  signal goes through that pidfd (`pidfd_send_signal`), so once the child is
  reaped the signal is ESRCH and can never reach a process that reused the
  number. The pidfd is closed and dropped when `stop()` has reaped the child.
- A child leads its own process group, so a stop also reaches what it forked.
  The group is signalled by number only while the leader is unreaped (checked
  with `waitid(P_PIDFD, WNOWAIT)` in the loop thread, the only place asyncio's
  pidfd watcher reaps): an unreaped leader pins its pid and so its group id.
- The supervisor is a child subreaper (`PR_SET_CHILD_SUBREAPER`): what a child
  forked comes back to us when the child dies, as our own unreaped child, so
  a leftover of a dead child's group is signalled as our child, never by a
  bare group number.
- A leftover from a killed supervisor (start-up sweep) is signalled only
  through a pidfd opened *before* its identity (pidfile pid + create time +
  argv) is checked, and only that process: never its group.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import select
import signal
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process (Linux >= 3.4).
    Returns False where the kernel refuses; stop() then cannot reach what a
    dead child left behind, and says nothing (never a number-based sweep)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class ParentDeathPipe:
    """One pipe per supervisor. Each tailscaled inherits the read end as
    TS_PARENT_DEATH_FD and exits when it reads EOF, i.e. when the supervisor
    dies for any reason, kill -9 included. Safer than PR_SET_PDEATHSIG, which
    needs preexec_fn next to asyncio's child watcher threads."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()  # both non-inheritable (O_CLOEXEC)

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass


# ---------------------------------------------------------------------------
# The child watcher: asyncio's pidfd watcher, which also hands us a pidfd of
# our own for each child, opened in the same synchronous step as the fork,
# before the child can be reaped.

_fresh_pidfds: dict[int, int] = {}


class _OwningPidfdWatcher(asyncio.PidfdChildWatcher):
    """Python 3.11's PidfdChildWatcher (reaps in the loop thread, no thread
    races), plus a second pidfd per child for procs.spawn to keep."""

    def add_child_handler(self, pid, callback, *args):  # type: ignore[no-untyped-def]
        if pid not in _fresh_pidfds:
            # Called right after fork by asyncio, before this watcher can reap:
            # the pid is still our child's.
            _fresh_pidfds[pid] = os.pidfd_open(pid)
        super().add_child_handler(pid, callback, *args)


_watched_loop: asyncio.AbstractEventLoop | None = None


def _ensure_watcher() -> None:
    """Install the owning pidfd watcher on the running loop (3.11). 3.12+
    already reaps through pidfds in the loop; spawn then opens its pidfd
    right after the fork, before the loop runs again."""
    global _watched_loop
    if sys.version_info >= (3, 12):
        return
    loop = asyncio.get_running_loop()
    if _watched_loop is loop:
        return
    watcher = _OwningPidfdWatcher()
    watcher.attach_loop(loop)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        asyncio.set_child_watcher(watcher)
    _watched_loop = loop


# ---------------------------------------------------------------------------
# Children


@dataclass(eq=False)
class Child:
    role: str
    proc: asyncio.subprocess.Process
    create_time: float
    pidfile: Path | None = None
    pidfd: int | None = None  # ours until stop() reaps the child; then None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None


_live: dict[int, Child] = {}  # pid -> children spawned and not yet released by stop()


class SpawnError(OSError):
    """The child started but could not be recorded (e.g. ENOSPC on its pidfile);
    it has been killed and reaped, so nothing runs untracked."""


def _unreaped(pidfd: int) -> bool:
    """True while the child behind `pidfd` has not been reaped (alive or zombie)."""
    try:
        os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        return True
    except ChildProcessError:
        return False
    except OSError:
        return False


def send_signal(child: Child, sig: int, *, group: bool = True) -> None:
    """Signal a child we own: its whole process group while the leader is
    unreaped (that pins the group id), else nothing but the leader through
    its pidfd (a reaped leader: ESRCH, silently). Never a bare number."""
    fd = child.pidfd
    if fd is None:
        return  # released: reaped and forgotten
    if group and _unreaped(fd):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, sig)  # start_new_session: the child leads its group
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        signal.pidfd_send_signal(fd, sig)


async def spawn(role: str, argv: Sequence[str], env: dict[str, str], *,
                pidfile: Path | None = None, pass_fds: Sequence[int] = ()) -> Child:
    """Start a child in its own process group with stdout+stderr on one pipe.

    Raises OSError if the child cannot start, SpawnError if it started but its
    pidfile could not be written (the child is then already killed and reaped).
    """
    _ensure_watcher()
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, start_new_session=True, pass_fds=tuple(pass_fds),
        limit=1 << 20)
    pidfd = _fresh_pidfds.pop(proc.pid, None)
    if pidfd is None and proc.returncode is None:  # 3.12+: no hook; the loop has not reaped yet
        with contextlib.suppress(OSError):
            pidfd = os.pidfd_open(proc.pid)
    try:
        create_time = psutil.Process(proc.pid).create_time()
    except psutil.Error:
        create_time = 0.0
    child = Child(role, proc, create_time, pidfile, pidfd)
    _live[proc.pid] = child
    if pidfile is not None:
        try:
            write_pidfile(pidfile, proc.pid, create_time, list(argv))
        except OSError as e:
            child.pidfile = None
            await stop(child, 0, signal.SIGKILL)
            raise SpawnError(e.errno, f"{role}: cannot record the child in {pidfile}: "
                                      f"{e.strerror or e}") from None
    return child


async def lines(stream: asyncio.StreamReader, limit: int = 64 << 10):
    """A child's output, line by line, as text. A line longer than `limit`
    bytes is cut into pieces instead of ending the reader: the pipe must
    keep draining, or the child blocks on a full pipe."""
    while True:
        try:
            raw = await stream.readuntil(b"\n")
        except asyncio.IncompleteReadError as e:
            if e.partial:
                yield e.partial.decode(errors="replace")
            return
        except asyncio.LimitOverrunError as e:
            raw = await stream.read(max(e.consumed, 1))
        except ValueError:  # the stream's own limit, past a separator search
            raw = await stream.read(limit)
        yield raw[:limit].decode(errors="replace").rstrip("\n")


def write_pidfile(path: Path, pid: int, create_time: float, argv: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps({"pid": pid, "create_time": create_time, "argv": argv}))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def _leftovers(pgid: int) -> list[psutil.Process]:
    """Our own children (re-parented to us, the subreaper) that are still in
    the group of a leader we just reaped and that we did not spawn ourselves.
    While any of them is in the group, no new process can take the number.

    Runs after every child we stop, every CLI run included, so it must not cost
    a read of every process's /proc/PID/stat (psutil's children(): with 200
    proxies, 600 CLI runs at start each parsed every process, O(N^2), most of
    the supervisor's CPU at start). A getpgid() per pid picks the group's
    members, and only those are asked their parent; the group is checked again
    once the parent is known to be us (an unreaped child's pid is not reused)."""
    out: list[psutil.Process] = []
    me = os.getpid()
    try:
        pids = [int(n) for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return out
    for pid in pids:
        if pid == me or pid in _live:
            continue
        try:
            if os.getpgid(pid) != pgid:
                continue
            p = psutil.Process(pid)
            if p.ppid() == me and os.getpgid(pid) == pgid:
                out.append(p)
        except (OSError, psutil.Error):
            continue
    return out


def _kill_and_reap(procs_: list[psutil.Process]) -> None:
    for p in procs_:
        with contextlib.suppress(psutil.Error):
            p.kill()  # our unreaped child: its pid cannot have been reused
    for p in procs_:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(p.pid, 0)


async def _exits(child: Child, timeout: float) -> bool:
    """Wait up to `timeout` s for the child itself to exit (its pidfd turns
    readable). Not proc.wait(): that also waits for every holder of the
    child's pipes, and a grandchild can hold them forever."""
    fd = child.pidfd
    if fd is None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(child.proc.wait()), timeout)
        return child.proc.returncode is not None
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.add_reader(fd, lambda: done.done() or done.set_result(None))
    try:
        await asyncio.wait_for(done, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)


async def stop(child: Child, grace: float, sig: int = signal.SIGTERM) -> int | None:
    """TERM the child's group, give it `grace` seconds, KILL the group, take
    back and kill what the group left re-parented to us, and always reap.
    Releases the child (its pidfd) afterwards. Returns the exit status."""
    if child.pidfd is None and child.pid not in _live:
        return child.proc.returncode  # already stopped and released
    send_signal(child, sig)
    if not await _exits(child, grace):
        send_signal(child, signal.SIGKILL)
        await _exits(child, 5)
    send_signal(child, signal.SIGKILL)  # the rest of the group, while the leader still pins it
    # Anything it forked that outlived it is our child now (subreaper).
    leftovers = await asyncio.to_thread(_leftovers, child.pid)
    if leftovers:
        await asyncio.to_thread(_kill_and_reap, leftovers)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(child.proc.wait()), 5)
    release(child)
    if child.pidfile is not None:
        child.pidfile.unlink(missing_ok=True)
    return child.proc.returncode


def release(child: Child) -> None:
    """Forget a child: close its pidfd. After this no signal can reach it."""
    if _live.get(child.pid) is child:
        del _live[child.pid]
    fd, child.pidfd = child.pidfd, None
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


# ---------------------------------------------------------------------------
# Leftovers of a killed supervisor


@dataclass
class Orphan:
    pidfile: Path
    process: psutil.Process
    pidfd: int

    def describe(self) -> str:
        try:
            argv = " ".join(self.process.cmdline()[:2])
        except psutil.Error:
            argv = "?"
        return f"pid {self.process.pid} ({argv})"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.pidfd)


def find_orphans(pidfiles: Iterable[Path]) -> list[Orphan]:
    """Processes named by leftover pidfiles that are provably ours: a pidfd is
    opened first, then pid, create time and argv must all match, so the
    pidfd holds exactly the process that was checked. Anything else is never
    touched, and its stale pidfile is removed. Callers close() what they get."""
    found = []
    for pidfile in pidfiles:
        pidfd = None
        try:
            rec = json.loads(pidfile.read_text())
            pid = int(rec["pid"])
            if pid <= 1:
                raise ValueError("not a child pid")
            pidfd = os.pidfd_open(pid)
            p = psutil.Process(pid)
            if abs(p.create_time() - float(rec["create_time"])) < 0.05 and p.cmdline() == rec["argv"]:
                found.append(Orphan(pidfile, p, pidfd))
                continue
        except (OSError, ValueError, KeyError, TypeError, psutil.Error):
            pass
        if pidfd is not None:
            os.close(pidfd)
        pidfile.unlink(missing_ok=True)
    return found


def _wait_pidfd(pidfd: int, timeout: float) -> bool:
    """Wait until the process behind pidfd has exited (readable). Not our
    child, so no reaping: whoever is its parent now does that."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(int(timeout * 1000)))


def kill_orphans(pidfiles: Iterable[Path], grace: float = 5.0) -> list[str]:
    """Stop what a killed supervisor left running: SIGKILL through each
    verified pidfd, waiting up to `grace` for each to exit. Only the verified
    process is signalled, never its group by number. Returns a description
    of each."""
    killed = []
    for o in find_orphans(pidfiles):
        try:
            killed.append(o.describe())
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(o.pidfd, signal.SIGKILL)
            _wait_pidfd(o.pidfd, grace)
            o.pidfile.unlink(missing_ok=True)
        finally:
            o.close()
    return killed
