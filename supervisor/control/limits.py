"""What keeps the embedded control's connections from starving the supervisor.

The control shares one process (and one RLIMIT_NOFILE) with the supervision
that spawns children, reaches LocalAPIs and opens files, and its port is open
to every local user. So:

- `connection_caps` gives the most connections the control may hold, leaving
  a reserve of file descriptors for supervision.
- `ConnectionTable` keeps each connection trusted (it proved a registered
  node's key) or not. Over a cap, the oldest untrusted connection is shed; a
  trusted one is never shed for a newcomer, and when all are trusted the
  newcomer is refused.
- `Summarized` turns a storm of like log lines into one line per interval with
  a count; `limit_accept_errors` routes asyncio's "socket.accept() out of
  system resource" (EMFILE: one traceback per failed accept, ~100 per loop turn)
  through it, for every listener of the process (`ts-supervisor run` installs it
  at start; the embedded control when it runs alone).
"""
from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

RESERVE_MIN = 256  # descriptors always left to supervision
CAP_MIN = 64
CAP_MAX = 4096  # ~36 KiB per ts2021 session: 4096 sessions are ~150 MiB, enough for a NAS
UNTRUSTED_MAX = 512
SUMMARY_INTERVAL = 10.0

# asyncio.selector_events.BaseSelectorEventLoop._accept_connection's context message
ACCEPT_ERROR = "socket.accept() out of system resource"

C = TypeVar("C", bound=Hashable)


def connection_caps(nofile: int) -> tuple[int, int]:
    """(cap on all connections, cap on untrusted ones) for a soft RLIMIT_NOFILE of `nofile`.

    Half the descriptors (at least RESERVE_MIN) stay with supervision; the rest,
    within [CAP_MIN, CAP_MAX], may be control connections, of which at most half
    (and at most UNTRUSTED_MAX) untrusted. A negative or huge `nofile`
    (RLIM_INFINITY) counts as huge."""
    if nofile < 0 or nofile > 1 << 30:
        nofile = 1 << 30
    cap = max(CAP_MIN, min(CAP_MAX, nofile - max(RESERVE_MIN, nofile // 2)))
    return cap, max(CAP_MIN // 4, min(cap // 2, UNTRUSTED_MAX))


def nofile_soft_limit() -> int:
    """This process's soft RLIMIT_NOFILE (RLIM_INFINITY as -1 or a huge number)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class ConnectionTable(Generic[C]):
    """The control's open connections: untrusted ones in arrival order, trusted ones.

    `admit(new)` -> (admitted, shed): `shed` are older untrusted connections the
    caller must close now to make room; when `admitted` is False the caller closes
    `new` at once (every connection held is trusted and the cap is reached). A
    flooder without a registered key thus holds at most `untrusted_cap`
    connections and can never displace a node that proved its key; a node's own
    new connection gets in and is safe once trusted, or once `untrusted_cap`
    newer ones have not yet arrived."""

    def __init__(self, cap: int, untrusted_cap: int) -> None:
        if not 1 <= untrusted_cap <= cap:
            raise ValueError(f"want 1 <= untrusted_cap <= cap, got {untrusted_cap}, {cap}")
        self.cap = cap
        self.untrusted_cap = untrusted_cap
        self._untrusted: dict[C, None] = {}  # insertion-ordered: oldest first
        self._trusted: set[C] = set()
        self.shed_total = 0
        self.refused_total = 0

    def __len__(self) -> int:
        return len(self._untrusted) + len(self._trusted)

    def __contains__(self, conn: object) -> bool:
        return conn in self._untrusted or conn in self._trusted

    @property
    def untrusted(self) -> int:
        return len(self._untrusted)

    def admit(self, conn: C) -> tuple[bool, list[C]]:
        shed: list[C] = []
        while self._untrusted and (len(self) >= self.cap or len(self._untrusted) >= self.untrusted_cap):
            oldest = next(iter(self._untrusted))
            del self._untrusted[oldest]
            shed.append(oldest)
        self.shed_total += len(shed)
        if len(self) >= self.cap:
            self.refused_total += 1
            return False, shed
        self._untrusted[conn] = None
        return True, shed

    def trust(self, conn: C) -> None:
        """The connection proved a registered key; a connection not held is ignored."""
        if conn in self._untrusted:
            del self._untrusted[conn]
            self._trusted.add(conn)

    def is_trusted(self, conn: C) -> bool:
        return conn in self._trusted

    def discard(self, conn: C) -> None:
        self._untrusted.pop(conn, None)
        self._trusted.discard(conn)


class Summarized:
    """Log lines of one kind (`key`) at most `burst` per `interval` seconds; the rest are
    counted, and their count is logged in one line when the interval ends:
    `<summary>: N more in the last 10 s`. The closing line is scheduled on the running
    loop (`later`), so a storm that stops still gets its count."""

    def __init__(self, emit: Callable[[str], None], *, interval: float = SUMMARY_INTERVAL,
                 burst: int = 1, clock: Callable[[], float] = time.monotonic,
                 later: Callable[[float, Callable[[], None]], Any] | None = None) -> None:
        self.emit = emit
        self.interval = interval
        self.burst = burst
        self.clock = clock
        self.later = later
        self._window: dict[str, tuple[float, int, int, str]] = {}  # key -> (start, shown, hidden, summary)

    def note(self, key: str, line: str, summary: str | None = None) -> bool:
        """Log `line`, or count it under `key` (True if it was logged). `summary` names
        what was counted in the closing line (default: `line`)."""
        now = self.clock()
        start, shown, hidden, _ = self._window.get(key, (now, 0, 0, ""))
        if now - start >= self.interval:
            self._close(key)
            start, shown, hidden = now, 0, 0
        if shown < self.burst:
            self._window[key] = (start, shown + 1, hidden, summary or line)
            self.emit(line)
            return True
        if hidden == 0:
            self._schedule(key, start + self.interval - now)
        self._window[key] = (start, shown, hidden + 1, summary or line)
        return False

    def _schedule(self, key: str, delay: float) -> None:
        later = self.later
        if later is None:
            try:
                later = asyncio.get_running_loop().call_later
            except RuntimeError:
                return  # no loop: the count is logged by the next note() or flush()
        later(max(0.0, delay), lambda: self._close(key))

    def _close(self, key: str) -> None:
        start, _, hidden, summary = self._window.pop(key, (0.0, 0, 0, ""))
        if hidden:
            self.emit(f"{summary}: {hidden} more in the last {self.interval:g} s")

    def flush(self) -> None:
        for key in list(self._window):
            self._close(key)


def limit_accept_errors(loop: asyncio.AbstractEventLoop, notes: Summarized) -> Callable[[], None]:
    """Route asyncio's accept-failure reports (EMFILE, ENFILE, ENOBUFS, ENOMEM: a
    traceback per failed accept, ~100 per loop turn, which wrote 37,000 stderr lines
    in 8 s) for every listener of the loop (the control's port, the supervisor's IPC
    socket, the metrics listener) through `notes`: per listening socket one line,
    then a count per interval. Every other exception context goes to the handler that
    was there before. Returns a function that puts that handler back (if ours is still
    the one installed). If the loop's handler already limits accept errors (the
    supervisor's, when the embedded control starts), it stays, and this is a no-op."""
    previous = loop.get_exception_handler()
    if getattr(previous, "limits_accept_errors", False):
        return lambda: None

    def handler(lp: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") == ACCEPT_ERROR:
            sock = context.get("socket")
            where = ""
            try:
                where = f" on {sock.getsockname()}" if sock is not None else ""
            except OSError:
                pass
            notes.note(f"accept{where}", f"accept{where} failed: {context.get('exception')}",
                       f"accept{where} failed")
            return
        if previous is not None:
            previous(lp, context)
        else:
            lp.default_exception_handler(context)

    handler.limits_accept_errors = True  # type: ignore[attr-defined]
    loop.set_exception_handler(handler)

    def restore() -> None:
        if loop.get_exception_handler() is handler:
            loop.set_exception_handler(previous)
    return restore
