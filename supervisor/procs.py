"""Process handling: spawn children we own, stop them bottom-up, find the
ones a killed supervisor left behind.

Rules: every child gets its own process group, so a stop reaches everything
it forked; we kill only by pid or process group, and only processes whose
pidfile (pid + create time + argv) proves we started them.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil


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


@dataclass
class Child:
    role: str
    proc: asyncio.subprocess.Process
    create_time: float
    pidfile: Path | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None


async def spawn(role: str, argv: Sequence[str], env: dict[str, str], *,
                pidfile: Path | None = None, pass_fds: Sequence[int] = ()) -> Child:
    """Start a child in its own process group with stdout+stderr on one pipe."""
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, start_new_session=True, pass_fds=tuple(pass_fds),
        limit=1 << 20)
    try:
        create_time = psutil.Process(proc.pid).create_time()
    except psutil.Error:
        create_time = 0.0
    child = Child(role, proc, create_time, pidfile)
    if pidfile is not None:
        write_pidfile(pidfile, proc.pid, create_time, list(argv))
    return child


def write_pidfile(path: Path, pid: int, create_time: float, argv: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": pid, "create_time": create_time, "argv": argv}))
    os.replace(tmp, path)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                members.append(p)
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return members


async def stop(child: Child, grace: float, sig: int = signal.SIGTERM) -> int | None:
    """TERM the child's group, give it `grace` seconds, KILL the group, sweep
    any member psutil still finds, and always reap. Returns the exit status."""
    pgid = child.pid  # start_new_session: the child leads its own group
    if child.alive:
        _signal_group(pgid, sig)
        try:
            await asyncio.wait_for(child.proc.wait(), grace)
        except TimeoutError:
            _signal_group(pgid, signal.SIGKILL)
    if child.alive:
        try:
            await asyncio.wait_for(child.proc.wait(), 5)
        except TimeoutError:
            pass
    # Grandchildren in the group outlive their parent; find and kill them too.
    leftovers = await asyncio.to_thread(_group_members, pgid)
    for p in leftovers:
        try:
            p.kill()
        except psutil.Error:
            pass
    if leftovers:
        await asyncio.to_thread(psutil.wait_procs, leftovers, 5)
    if child.pidfile is not None:
        child.pidfile.unlink(missing_ok=True)
    return child.proc.returncode


def find_orphans(pidfiles: Iterable[Path]) -> list[tuple[Path, psutil.Process]]:
    """Processes named by leftover pidfiles that are provably ours: same pid,
    same create time, same argv. Anything else is never touched."""
    found = []
    for pidfile in pidfiles:
        try:
            rec = json.loads(pidfile.read_text())
            p = psutil.Process(int(rec["pid"]))
            if abs(p.create_time() - float(rec["create_time"])) < 0.05 and p.cmdline() == rec["argv"]:
                found.append((pidfile, p))
            else:
                pidfile.unlink(missing_ok=True)
        except (OSError, ValueError, KeyError, TypeError, psutil.Error):
            pidfile.unlink(missing_ok=True)
    return found


def kill_orphans(pidfiles: Iterable[Path]) -> list[str]:
    """Stop what a killed supervisor left running (bottom-up: children first,
    then the leader, by process group). Returns a description of each."""
    killed = []
    groups: list[psutil.Process] = []
    for path, p in find_orphans(pidfiles):
        killed.append(f"pid {p.pid} ({' '.join(p.cmdline()[:2])})")
        groups.append(p)
        path.unlink(missing_ok=True)
    for p in groups:
        try:
            members = [m for m in _group_members(p.pid) if m.pid != p.pid]
            for m in members:
                m.kill()
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(groups, 5)
    return killed
