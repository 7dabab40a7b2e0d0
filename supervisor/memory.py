"""What each proxy's children cost: memory as PSS and USS (besides RSS) and CPU,
sampled on a slow timer into the proxy's snapshot, never when something is drawn.

RSS counts every resident page a process maps, so N tailscaleds running one
binary each count that binary's shared pages in full: the sum over a fleet
says several times what the machine pays. PSS (proportional set size) splits
each shared page among the processes that map it, so PSS sums to what the
fleet really costs (what `free` sees); USS (Private_Clean + Private_Dirty) is
what the kernel gets back if that one process exits. Source: Linux
Documentation/filesystems/proc.rst ("/proc/PID/smaps_rollup"), read through
psutil.Process.memory_full_info() (psutil/_pslinux.py: smaps_rollup, with
/proc/PID/smaps as its fallback).

Cost: one pass reads three small /proc files per live child (stat, statm,
smaps_rollup; the last walks the child's page tables). Measured at about
0.7 ms per tailscaled on a loaded 2-core VM, so about 140 ms for 200 proxies,
all in a worker thread: at the default `memory_period` of 60 s that is near
0.2 % of one core. `Sampler.sample()` is that pass (blocking); `run()` calls
it in a thread every `period` seconds. Only children the supervisor owns and
has not reaped are read, each checked against its recorded start time, so a
recycled pid is never measured as ours. Nothing here signals anything.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import psutil

DEFAULT_PERIOD = 60.0  # seconds between passes (the `memory_period` setting); 0 turns sampling off
SAME_START = 0.05      # seconds: a pid whose start time differs more is not the child we spawned


@dataclass(frozen=True)
class ChildRef:
    """One live child as the supervisor recorded it (procs.Child): its role
    ("tailscaled", "up", "serve", ...), pid and psutil create_time (epoch s)."""

    role: str
    pid: int
    create_time: float


@dataclass(frozen=True)
class Reading:
    """One child's figures at one moment: bytes, and CPU seconds (user + system)
    since it started. `pss`/`uss` are None when smaps_rollup is unreadable."""

    role: str
    pid: int
    create_time: float
    rss: int
    pss: int | None
    uss: int | None
    cpu_s: float


@dataclass(frozen=True)
class Usage:
    """One proxy's live children at one pass.

    rss, pss, uss: bytes summed over the children (pss/uss None if any child's
    smaps_rollup could not be read, rather than a sum that leaves one out);
    cpu: % of one core the children used since the previous pass (None on the
    first pass that saw them); children: how many were read; at: wall clock (s)."""

    rss: int
    pss: int | None
    uss: int | None
    cpu: float | None
    children: int
    at: float

    def to_json(self) -> dict:
        """The `memory` object of a proxy in `status --json` (README)."""
        from supervisor.events import iso
        return {"pss": self.pss, "uss": self.uss, "rss": self.rss,
                "cpu_percent": None if self.cpu is None else round(self.cpu, 2),
                "children": self.children, "sampled_at": iso(self.at)}

    @classmethod
    def from_json(cls, d: Mapping | None) -> "Usage | None":
        if not d:
            return None
        from datetime import datetime
        return cls(rss=int(d.get("rss") or 0), pss=d.get("pss"), uss=d.get("uss"), cpu=d.get("cpu_percent"),
                   children=int(d.get("children") or 0),
                   at=datetime.fromisoformat(d["sampled_at"]).timestamp() if d.get("sampled_at") else 0.0)


def kind(role: str) -> str:
    """The child kind figures are grouped by: "tailscaled", or "tailscale ROLE"
    for a CLI child (`tailscale up`, `tailscale serve`, ...)."""
    return role if role == "tailscaled" else f"tailscale {role}"


def _sum(values: Iterable[int | None]) -> int | None:
    total = 0
    for v in values:
        if v is None:
            return None
        total += v
    return total


def cpu_percent(readings: Sequence[Reading], before: Mapping[tuple[int, float], float] | None,
                since: float | None, dt: float) -> float | None:
    """% of one core `readings`' children used over the last `dt` seconds.

    `before`: CPU seconds per (pid, create_time) at the previous pass (None: no
    previous pass); `since`: that pass's wall clock. A child started after it
    counts all its CPU seconds; one already running then but not in `before`
    cannot be told apart from its past, so the figure is None. A child that
    exited between passes takes its last seconds with it (not counted)."""
    if before is None or since is None or dt <= 0:
        return None
    used = 0.0
    for r in readings:
        prev = before.get((r.pid, r.create_time))
        if prev is None:
            if r.create_time < since:
                return None
            prev = 0.0
        used += max(0.0, r.cpu_s - prev)
    return used / dt * 100


def combine(readings: Sequence[Reading], cpu: float | None, at: float) -> Usage:
    """One proxy's Usage from its children's readings (pure)."""
    return Usage(rss=sum(r.rss for r in readings), pss=_sum(r.pss for r in readings),
                 uss=_sum(r.uss for r in readings), cpu=cpu, children=len(readings), at=at)


def by_kind(readings: Iterable[Reading]) -> dict[str, dict[str, int | None]]:
    """Totals per child kind: {kind: {"count", "rss", "pss", "uss"}} (bytes),
    for scripts/bench. pss/uss None as soon as one of the kind's is."""
    groups: dict[str, list[Reading]] = {}
    for r in readings:
        groups.setdefault(kind(r.role), []).append(r)
    return {k: {"count": len(rs), "rss": sum(r.rss for r in rs), "pss": _sum(r.pss for r in rs),
                "uss": _sum(r.uss for r in rs)} for k, rs in sorted(groups.items())}


def read(ref: ChildRef) -> Reading | None:
    """One child's figures, or None when it is gone or its pid now names another
    process (its start time differs from the recorded one). Blocking: three
    /proc reads (psutil.Process.oneshot caches stat between them)."""
    try:
        p = psutil.Process(ref.pid)
        with p.oneshot():
            if abs(p.create_time() - ref.create_time) > SAME_START:
                return None
            times = p.cpu_times()
            try:
                full = p.memory_full_info()
                rss, pss, uss = full.rss, full.pss, full.uss
            except psutil.AccessDenied:  # smaps_rollup needs ptrace-read access; statm does not
                rss, pss, uss = p.memory_info().rss, None, None
    except psutil.Error:
        return None
    return Reading(ref.role, ref.pid, ref.create_time, rss, pss, uss, times.user + times.system)


class Sampler:
    """One pass over every proxy's children (`sample`), keeping what CPU% needs
    from the previous pass. Used from one thread at a time."""

    def __init__(self, reader: Callable[[ChildRef], Reading | None] = read) -> None:
        self._read = reader
        self._cpu: dict[tuple[int, float], float] | None = None
        self._mono: float | None = None
        self._wall: float | None = None

    def sample(self, children: Mapping[str, Sequence[ChildRef]]) -> dict[str, Usage]:
        """{proxy: Usage} for every proxy named, a proxy without live children
        included (zeros). Blocking: run it in a thread."""
        mono, wall = time.monotonic(), time.time()
        dt = mono - self._mono if self._mono is not None else 0.0
        out: dict[str, Usage] = {}
        seen: dict[tuple[int, float], float] = {}
        for name, refs in children.items():
            readings = [r for ref in refs if (r := self._read(ref)) is not None]
            out[name] = combine(readings, cpu_percent(readings, self._cpu, self._wall, dt), wall)
            seen.update(((r.pid, r.create_time), r.cpu_s) for r in readings)
        self._cpu, self._mono, self._wall = seen, mono, wall
        return out


async def run(children: Callable[[], Mapping[str, Sequence[ChildRef]]],
              apply: Callable[[Mapping[str, Usage]], None], period: float = DEFAULT_PERIOD,
              on_error: Callable[[Exception], None] | None = None) -> None:
    """Every `period` seconds: `children()` on the loop, one Sampler pass in a
    worker thread, `apply(usage)` on the loop. Runs until cancelled; a pass
    that raises (a bug: /proc errors are a child's None) goes to `on_error`
    and the next pass comes on time."""
    sampler = Sampler()
    while True:
        try:
            refs = children()
            apply(await asyncio.to_thread(sampler.sample, refs))
        except Exception as e:
            if on_error is not None:
                on_error(e)
        await asyncio.sleep(period)
