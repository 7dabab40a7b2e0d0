"""The children's memory (PSS/USS/RSS) and CPU: the pure sums table-tested, the
/proc read against a real child of this test."""
import subprocess
import sys
import time

import psutil
import pytest

from supervisor import memory
from supervisor.memory import ChildRef, Reading, Sampler, Usage, by_kind, combine, cpu_percent, kind

MiB = 2**20


def r(role="tailscaled", pid=100, ct=1000.0, rss=30 * MiB, pss=12 * MiB, uss=7 * MiB, cpu=1.0) -> Reading:
    return Reading(role, pid, ct, rss, pss, uss, cpu)


@pytest.mark.parametrize("role, want", [
    ("tailscaled", "tailscaled"), ("up", "tailscale up"), ("serve", "tailscale serve"),
    ("logout", "tailscale logout"),
])
def test_kind(role, want):
    assert kind(role) == want


@pytest.mark.parametrize("readings, before, since, dt, want", [
    # no previous pass, or no time between passes: unknown
    ([r(cpu=5.0)], None, None, 60.0, None),
    ([r(cpu=5.0)], {(100, 1000.0): 2.0}, 1500.0, 0.0, None),
    # 3 CPU seconds over 60 s = 5 % of a core
    ([r(cpu=5.0)], {(100, 1000.0): 2.0}, 1500.0, 60.0, 5.0),
    # two children add up
    ([r(cpu=5.0), r(pid=101, cpu=4.0)], {(100, 1000.0): 2.0, (101, 1000.0): 1.0}, 1500.0, 60.0, 10.0),
    # a child started after the previous pass: all its CPU seconds are in the interval
    ([r(cpu=5.0), r(pid=102, ct=1600.0, cpu=0.6)], {(100, 1000.0): 2.0}, 1500.0, 60.0, 6.0),
    # a child that ran before the previous pass but was not read then: cannot tell
    ([r(cpu=5.0), r(pid=103, ct=900.0, cpu=0.6)], {(100, 1000.0): 2.0}, 1500.0, 60.0, None),
    # a recycled pid (same pid, other start time) is another child, started after
    ([r(ct=1700.0, cpu=0.3)], {(100, 1000.0): 50.0}, 1500.0, 60.0, 0.5),
    # no children: nothing used
    ([], {(100, 1000.0): 2.0}, 1500.0, 60.0, 0.0),
])
def test_cpu_percent(readings, before, since, dt, want):
    got = cpu_percent(readings, before, since, dt)
    assert got == pytest.approx(want) if want is not None else got is None


@pytest.mark.parametrize("readings, want", [
    ([], Usage(0, 0, 0, None, 0, 5.0)),
    ([r(), r(role="up", pid=101, rss=20 * MiB, pss=3 * MiB, uss=2 * MiB)],
     Usage(50 * MiB, 15 * MiB, 9 * MiB, None, 2, 5.0)),
    # one unreadable smaps_rollup: no PSS/USS sum that leaves it out
    ([r(), r(pid=101, pss=None, uss=None)], Usage(60 * MiB, None, None, None, 2, 5.0)),
])
def test_combine(readings, want):
    assert combine(readings, None, 5.0) == want


def test_by_kind_groups_and_sums_per_child_kind():
    got = by_kind([r(), r(pid=101), r(role="serve", pid=102, rss=20 * MiB, pss=3 * MiB, uss=2 * MiB),
                   r(role="up", pid=103, pss=None)])
    assert got == {
        "tailscaled": {"count": 2, "rss": 60 * MiB, "pss": 24 * MiB, "uss": 14 * MiB},
        "tailscale serve": {"count": 1, "rss": 20 * MiB, "pss": 3 * MiB, "uss": 2 * MiB},
        "tailscale up": {"count": 1, "rss": 30 * MiB, "pss": None, "uss": 7 * MiB},
    }


@pytest.mark.parametrize("usage", [
    Usage(50 * MiB, 15 * MiB, 9 * MiB, 1.25, 2, 1_700_000_000.5),
    Usage(0, 0, 0, None, 0, 1_700_000_000.0),
    Usage(50 * MiB, None, None, None, 1, 1_700_000_000.0),
])
def test_usage_survives_status_json(usage):
    assert Usage.from_json(usage.to_json()) == usage
    assert Usage.from_json(None) is None


def test_sampler_one_pass_per_proxy_and_cpu_from_the_previous_pass():
    """With a fake reader (named so): the sums per proxy, a proxy without children,
    a child gone between passes, and CPU% from the pass before."""
    cpu = {1: 1.0, 2: 0.5}

    def fake_read(ref: ChildRef) -> Reading | None:
        if ref.pid not in cpu:
            return None  # gone
        return Reading(ref.role, ref.pid, ref.create_time, 10 * MiB, 4 * MiB, 3 * MiB, cpu[ref.pid])
    s = Sampler(fake_read)
    refs = {"a": [ChildRef("tailscaled", 1, 1.0), ChildRef("up", 2, 1.0)], "b": [],
            "c": [ChildRef("tailscaled", 9, 1.0)]}
    first = s.sample(refs)
    assert first["a"].pss == 8 * MiB and first["a"].children == 2 and first["a"].cpu is None
    assert first["b"] == Usage(0, 0, 0, None, 0, first["b"].at) and first["c"].children == 0
    cpu[1] += 0.02
    del cpu[2]  # `up` finished
    time.sleep(0.05)
    second = s.sample(refs)
    assert second["a"].children == 1 and second["a"].pss == 4 * MiB
    assert second["a"].cpu is not None and 0 < second["a"].cpu <= 0.02 / 0.05 * 100


def test_read_a_real_child_and_refuse_a_recycled_pid():
    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(8 << 20); time.sleep(30)"])
    try:
        ct = psutil.Process(child.pid).create_time()
        deadline = time.monotonic() + 10
        while True:  # until the child has touched its 8 MiB
            got = memory.read(ChildRef("tailscaled", child.pid, ct))
            assert got is not None
            if got.uss >= 8 * MiB or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert got.uss >= 8 * MiB and got.uss <= got.pss <= got.rss and got.cpu_s >= 0
        assert memory.read(ChildRef("tailscaled", child.pid, ct - 5)) is None  # not the child we started
    finally:
        child.kill()
        child.wait()
    assert memory.read(ChildRef("tailscaled", child.pid, ct)) is None  # reaped


def test_run_samples_every_period_and_outlives_a_failing_pass():
    """memory.run with fake children/apply callbacks (named so): passes keep coming
    after one raises, and the error is handed over, not swallowed."""
    import asyncio
    applied, errors, calls = [], [], []

    def fake_children():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return {"a": []}

    async def go():
        task = asyncio.create_task(memory.run(fake_children, applied.append, 0.01, errors.append))
        deadline = time.monotonic() + 10
        while len(applied) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    asyncio.run(go())
    assert len(applied) >= 3 and set(applied[0]) == {"a"} and applied[0]["a"].children == 0
    assert [str(e) for e in errors] == ["boom"]
