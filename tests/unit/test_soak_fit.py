"""scripts/soak's slope and its 95 % interval, against data whose answers are
published, and its table of Student's t (values as R's qt(0.975, df) gives them)."""
from __future__ import annotations

import pytest

from scripts.soak import child_kind, fit_line, t95

ANSCOMBE_X = [10, 8, 13, 9, 11, 14, 6, 4, 12, 7, 5]
ANSCOMBE_Y1 = [8.04, 6.95, 7.58, 8.81, 8.33, 9.96, 7.24, 4.26, 10.84, 4.82, 5.68]


@pytest.mark.parametrize("xs, ys, slope, intercept, low, high", [
    # an exact line: the interval has no width
    ([0, 1, 2, 3], [5, 7, 9, 11], 2.0, 5.0, 2.0, 2.0),
    ([0.0, 0.5, 1.0], [100.0, 100.0, 100.0], 0.0, 100.0, 0.0, 0.0),  # flat
    # the textbook five points: slope 0.6, SE sqrt(0.08), t(3) = 3.1824
    ([1, 2, 3, 4, 5], [2, 4, 5, 4, 5], 0.6, 2.2, -0.3001, 1.5001),
    # Anscombe's quartet, set I (Anscombe 1973): R's confint(lm(y1 ~ x1)) gives 0.2333..0.7668
    (ANSCOMBE_X, ANSCOMBE_Y1, 0.50009, 3.00009, 0.23337, 0.76682),
    # falling memory: a negative slope and interval
    ([0, 1, 2, 3, 4], [10.0, 9.1, 7.9, 7.0, 6.1], -0.99, 10.0, -1.0855, -0.8945),
])
def test_fit_line(xs, ys, slope, intercept, low, high) -> None:
    f = fit_line(xs, ys)
    assert f.slope == pytest.approx(slope, abs=1e-4)
    assert f.intercept == pytest.approx(intercept, abs=1e-4)
    assert (f.low, f.high) == (pytest.approx(low, abs=1e-4), pytest.approx(high, abs=1e-4))
    assert f.n == len(xs)


@pytest.mark.parametrize("xs, ys, reason", [
    ([1, 2], [1, 2], "at least 3 points"),
    ([1, 1, 1], [1, 2, 3], "all xs are equal"),
    ([1, 2, 3], [1, 2], "3 xs but 2 ys"),
])
def test_fit_line_refuses(xs, ys, reason) -> None:
    with pytest.raises(ValueError, match=reason):
        fit_line(xs, ys)


@pytest.mark.parametrize("df, t", [
    (1, 12.7062), (2, 4.3027), (10, 2.2281), (30, 2.0423),
    (35, 2.0301), (45, 2.0141), (70, 1.9944), (118, 1.9803),  # between rows: linear in 1/df
    (150, 1.9759), (300, 1.9679), (2000, 1.9612), (10**7, 1.9600),
])
def test_t95(df, t) -> None:
    assert t95(df) == pytest.approx(t, abs=6e-4)


def test_t95_refuses_no_degrees_of_freedom() -> None:
    with pytest.raises(ValueError, match="at least 1 degree"):
        t95(0)


@pytest.mark.parametrize("cmdline, kind", [
    (["/opt/ts/tailscaled", "--statedir=/x", "--tun=userspace-networking"], "tailscaled"),
    (["/opt/ts/tailscale", "--socket=/x/tailscaled.sock", "up", "--timeout=60s"], "tailscale CLI"),
    (["tailscale", "serve", "--bg", "--http=80", "http://127.0.0.1:8000"], "tailscale CLI"),
    (["/usr/bin/python3", "-m", "something"], "other"),
    ([], "other"),  # a zombie's or a kernel thread's empty command line
])
def test_child_kind(cmdline, kind) -> None:
    assert child_kind(cmdline) == kind
