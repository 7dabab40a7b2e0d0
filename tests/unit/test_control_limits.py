"""supervisor/control/limits.py: the connection caps from RLIMIT_NOFILE, the table that
sheds the oldest unproven connection, and the log summarizer (pure: a fake clock and a
list of scheduled closings stand in for the event loop)."""
from __future__ import annotations

import asyncio
import errno
import socket
from typing import Any

import pytest

from supervisor.control.limits import (ACCEPT_ERROR, CAP_MAX, ConnectionTable, Summarized,
                                       connection_caps, limit_accept_errors)


@pytest.mark.parametrize("nofile, caps", [
    (1024, (512, 256)),        # systemd's default soft limit: half stays with supervision
    (4096, (2048, 512)),
    (20000, (CAP_MAX, 512)),   # plenty: the cap bounds memory (~36 KiB a session), not descriptors
    (524288, (CAP_MAX, 512)),
    (512, (256, 128)),         # the reserve is at least 256 descriptors
    (300, (64, 32)),           # tiny limits still let a few nodes in
    (0, (64, 32)),
    (-1, (CAP_MAX, 512)),      # RLIM_INFINITY
    (2**63, (CAP_MAX, 512)),
])
def test_connection_caps(nofile: int, caps: tuple[int, int]) -> None:
    assert connection_caps(nofile) == caps


def test_caps_always_leave_a_reserve_and_admit_some_unproven() -> None:
    for nofile in range(600, 70000, 997):
        cap, untrusted = connection_caps(nofile)
        assert cap <= nofile - 256 and 1 <= untrusted <= cap


def replay(table: ConnectionTable[str], steps: list[str]) -> list[Any]:
    """Steps: "+x" admits x, "*x" trusts x, "-x" discards x; each gives what admit answered."""
    out: list[Any] = []
    for step in steps:
        op, name = step[0], step[1:]
        if op == "+":
            admitted, shed = table.admit(name)
            out.append((admitted, shed))
        elif op == "*":
            table.trust(name)
        else:
            table.discard(name)
    return out


@pytest.mark.parametrize("cap, untrusted_cap, steps, answers, held", [
    # under both caps: everyone is admitted, nothing shed
    (4, 2, ["+a", "+b"], [(True, []), (True, [])], {"a", "b"}),
    # a third unproven one sheds the oldest unproven
    (4, 2, ["+a", "+b", "+c"], [(True, []), (True, []), (True, ["a"])], {"b", "c"}),
    # proven connections are never shed: the oldest *unproven* goes
    (4, 2, ["+a", "*a", "+b", "+c", "+d"], [(True, []), (True, []), (True, []), (True, ["b"])],
     {"a", "c", "d"}),
    # the total cap: a mix of proven and unproven sheds unproven first
    (3, 3, ["+a", "*a", "+b", "*b", "+c", "+d"], [(True, []), (True, []), (True, []), (True, ["c"])],
     {"a", "b", "d"}),
    # every connection proven and the cap reached: the newcomer is refused, nobody shed
    (2, 1, ["+a", "*a", "+b", "*b", "+c"], [(True, []), (True, []), (False, [])], {"a", "b"}),
    # a closed connection frees its place
    (2, 1, ["+a", "*a", "+b", "*b", "-a", "+c"], [(True, []), (True, []), (True, [])], {"b", "c"}),
    # trusting a connection that was shed (or never held) changes nothing
    (2, 1, ["+a", "+b", "*a"], [(True, []), (True, ["a"])], {"b"}),
])
def test_connection_table(cap: int, untrusted_cap: int, steps: list[str], answers: list[Any],
                          held: set[str]) -> None:
    table: ConnectionTable[str] = ConnectionTable(cap, untrusted_cap)
    assert replay(table, steps) == answers
    assert {c for c in "abcd" if c in table} == held
    assert len(table) == len(held) <= cap and table.untrusted <= untrusted_cap


def test_a_flood_holds_at_most_the_unproven_cap_and_never_displaces_a_node() -> None:
    table: ConnectionTable[str] = ConnectionTable(8, 3)
    replay(table, ["+node1", "*node1", "+node2", "*node2"])
    for i in range(1000):
        admitted, _ = table.admit(f"flood{i}")
        assert admitted
    assert table.is_trusted("node1") and table.is_trusted("node2")
    assert table.untrusted == 3 and len(table) == 5
    assert table.shed_total == 997 and table.refused_total == 0
    # a node's new connection gets in, and is safe once it proves its key
    assert table.admit("node3")[0]
    table.trust("node3")
    for i in range(1000, 1100):
        table.admit(f"flood{i}")
    assert table.is_trusted("node3")


def test_connection_table_refuses_nonsense_caps() -> None:
    with pytest.raises(ValueError):
        ConnectionTable(2, 3)
    with pytest.raises(ValueError):
        ConnectionTable(2, 0)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.scheduled: list[tuple[float, Any]] = []

    def later(self, delay: float, fn: Any) -> None:
        self.scheduled.append((self.now + delay, fn))

    def advance(self, seconds: float) -> None:
        self.now += seconds
        due = [fn for t, fn in self.scheduled if t <= self.now]
        self.scheduled = [(t, fn) for t, fn in self.scheduled if t > self.now]
        for fn in due:
            fn()


def summarized(burst: int = 1) -> tuple[Summarized, list[str], Clock]:
    lines: list[str] = []
    clock = Clock()
    return Summarized(lines.append, interval=10, burst=burst, clock=lambda: clock.now,
                      later=clock.later), lines, clock


def test_a_storm_is_one_line_then_one_count_per_interval() -> None:
    notes, lines, clock = summarized()
    for i in range(37000):
        notes.note("accept", f"accept failed: EMFILE #{i}", "accept failed")
        clock.advance(8 / 37000)
    assert lines == ["accept failed: EMFILE #0"]
    clock.advance(2)  # the interval ends: its count, even though the storm stopped
    assert lines == ["accept failed: EMFILE #0", "accept failed: 36999 more in the last 10 s"]
    clock.advance(60)
    assert len(lines) == 2
    notes.note("accept", "accept failed: again")  # a new interval starts with a line
    assert lines[-1] == "accept failed: again"


def test_summaries_are_per_kind_and_burst_lines_are_shown() -> None:
    notes, lines, clock = summarized(burst=2)
    assert notes.note("a", "a1") and notes.note("a", "a2") and not notes.note("a", "a3")
    assert notes.note("b", "b1")
    assert lines == ["a1", "a2", "b1"]
    clock.advance(10)
    assert lines == ["a1", "a2", "b1", "a3: 1 more in the last 10 s"]
    for line in ("b2", "b3", "b4"):  # b's interval ended too: a new one, two lines shown
        notes.note("b", line)
    notes.flush()
    assert lines[-3:] == ["b2", "b3", "b4: 1 more in the last 10 s"]


def test_a_quiet_interval_logs_no_count() -> None:
    notes, lines, clock = summarized()
    notes.note("x", "once")
    clock.advance(30)
    notes.flush()
    assert lines == ["once"]


def test_accept_errors_go_through_the_summary_and_others_to_the_old_handler() -> None:
    lines: list[str] = []
    others: list[dict[str, Any]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda lp, ctx: others.append(ctx))
        restore = limit_accept_errors(loop, Summarized(lines.append))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            for _ in range(500):
                loop.call_exception_handler({"message": ACCEPT_ERROR, "socket": sock,
                                             "exception": OSError(errno.EMFILE, "Too many open files")})
        loop.call_exception_handler({"message": "something else"})
        restore()
        assert loop.get_exception_handler() is not None
        loop.call_exception_handler({"message": "after restore"})

    asyncio.run(main())
    assert len(lines) == 1 and "[Errno 24] Too many open files" in lines[0]
    assert lines[0].startswith("accept on ('127.0.0.1', ")
    assert [c["message"] for c in others] == ["something else", "after restore"]


def test_a_second_accept_limiter_on_the_same_loop_is_a_no_op_and_each_listener_gets_its_line() -> None:
    """`ts-supervisor run` installs one for all its listeners; the embedded control's
    own, started later, keeps the first in place."""
    first: list[str] = []
    second: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        restore = limit_accept_errors(loop, Summarized(first.append))
        handler = loop.get_exception_handler()
        limit_accept_errors(loop, Summarized(second.append))()
        assert loop.get_exception_handler() is handler
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            b.bind(("127.0.0.1", 0))
            for sock in (a, b, a, b):
                loop.call_exception_handler({"message": ACCEPT_ERROR, "socket": sock,
                                             "exception": OSError(errno.EMFILE, "Too many open files")})
        restore()

    asyncio.run(main())
    assert second == [] and len(first) == 2 and first[0] != first[1], first
