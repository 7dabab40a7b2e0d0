"""Go's runtime knobs set in ts-supervisor.toml reach the real tailscaled the
supervisor runs (its /proc/PID/environ), and the supervisor's own GOGC or
GOMEMLIMIT never does (children get an allow-list environment)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_supervisor import run_proxy

pytestmark = pytest.mark.real


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    return dict(e.split("=", 1) for e in raw.split("\0") if "=" in e)


@pytest.mark.parametrize(("settings", "want"), [
    ({"tailscaled_gogc": 50, "tailscaled_gomemlimit": "64MiB"}, {"GOGC": "50", "GOMEMLIMIT": "64MiB"}),
    ({}, {}),
])
def test_a_running_tailscaled_has_the_go_knobs_of_the_settings(sup, control, tmp_path, any_bins,
                                                               settings, want):
    sup.settings.update(settings, tailscale=str(any_bins.tailscale), tailscaled=str(any_bins.tailscaled))
    sup.env.update(GOGC="7", GOMEMLIMIT="1MiB")  # the supervisor's own: not for children
    run_proxy(sup, control, tmp_path, "app")
    env = environ(sup.status()["app"]["pid"])
    assert {k: env[k] for k in ("GOGC", "GOMEMLIMIT") if k in env} == want
