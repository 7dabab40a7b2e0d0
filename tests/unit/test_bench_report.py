"""scripts/bench's pure report parts: the profile's top frames from py-spy's
raw format, and issue 14's scale targets from the measured points."""
from __future__ import annotations

import pytest

from scripts.bench import scale_targets, top_frames

RAW = "\n".join([
    "process 1:\"python\";main (a.py:1);run (a.py:5);_reload (fleet.py:9) 30",
    "process 1:\"python\";main (a.py:1);run (a.py:5);render (console.py:3) 10",
    "process 1:\"python\";main (a.py:1);select (selectors.py:468) 500",   # idle: not busy
    "thread 7;_worker (concurrent/futures/thread.py:81) 80",              # an idle pool thread
    "process 1:\"python\";run_forever (asyncio/base_events.py:607);_run (asyncio/events.py:80) 5",
    "garbage line without a count",
    "",
])


def test_top_frames_inclusive_share_of_busy_samples() -> None:
    top = dict(top_frames(RAW))
    assert top["main (a.py:1)"] == pytest.approx(40 / 45)
    assert top["_reload (fleet.py:9)"] == pytest.approx(30 / 45)
    assert top["render (console.py:3)"] == pytest.approx(10 / 45)
    # idle stacks are not busy; the event loop's own frames are in every stack: not listed
    assert not any(f.startswith(("select", "_worker", "process", "run_forever", "_run ")) for f in top)


@pytest.mark.parametrize("raw, n, want", [
    ("", 5, []),
    ("process 1;select (selectors.py:1) 9", 5, []),                # all idle
    ("process 1;a (x.py:1);b (x.py:2) 3\nprocess 1;a (x.py:1) 1", 1, [("a (x.py:1)", 1.0)]),
    ("a;b 2\na;a 2", 5, [("a", 1.0), ("b", 0.5)]),                # a frame twice in a stack counts once
])
def test_top_frames_table(raw, n, want) -> None:
    assert top_frames(raw, n) == [(f, pytest.approx(s)) for f, s in want]


def point(size, peers="clients", **kw):
    base = {"size": size, "peers": peers, "all_running_s": 10.0, "cpu_pct": 0.5, "rss_mb": 60.0,
            "frame_ms": 20.0, "pss_per_proxy_mb": 10.0}
    return {**base, **kw}


@pytest.mark.parametrize("scale, want", [
    # all met at 200 and 50
    ([point(50), point(200)],
     {("200 proxies, peers clients: all running < 30 s", True),
      ("200 proxies, peers clients: supervisor CPU < 2% of a core", True),
      ("200 proxies, peers clients: supervisor RSS < 100 MB", True),
      ("200 proxies, peers clients: one table frame < 50 ms", True),
      ("50 proxies, peers clients: children PSS <= 12 MiB per proxy", True)}),
    # missed: slow start, busy, 100 MB is not 100 MiB (96 MiB > 100e6 bytes), slow frame, fat children
    ([point(50, pss_per_proxy_mb=12.5), point(200, all_running_s=30.0, cpu_pct=2.0, rss_mb=96.0, frame_ms=50.0)],
     {("200 proxies, peers clients: all running < 30 s", False),
      ("200 proxies, peers clients: supervisor CPU < 2% of a core", False),
      ("200 proxies, peers clients: supervisor RSS < 100 MB", False),
      ("200 proxies, peers clients: one table frame < 50 ms", False),
      ("50 proxies, peers clients: children PSS <= 12 MiB per proxy", False)}),
    # no 200 point: no start target; no 50 point: no PSS target; per policy
    ([point(100, "all", frame_ms=None)],
     {("100 proxies, peers all: supervisor CPU < 2% of a core", True),
      ("100 proxies, peers all: supervisor RSS < 100 MB", True)}),
])
def test_scale_targets(scale, want) -> None:
    assert {(what, ok) for what, _, ok in scale_targets(scale)} == want
