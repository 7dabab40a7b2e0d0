"""The figures behind scripts/bench-recovery (run it through that wrapper).

Both logs carry CLOCK_MONOTONIC times (system-wide on Linux), so the
control's decision and the supervisor's reaction compare directly."""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from tests.fixtures_control import ControlThread
from tests.supervisor_harness import SupervisorProc


def main() -> None:
    ap = argparse.ArgumentParser(prog="scripts/bench-recovery")
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    control = ControlThread(root / "control")
    key = root / "key.secret"
    key.write_text(control.create_key(reusable=True)["secret"])
    # A 1 s healthy period re-arms the one-wipe budget between rounds.
    sup = SupervisorProc(root / "conf.d", root / "data", settings={"healthy_period": 1.0})
    sup.write_proxy("app", hostname="app", target="http://127.0.0.1:9", serve="http", port=80,
                    login_server=control.url, auth_key_file=str(key))
    detect, recover = [], []
    try:
        sup.start()
        sup.wait_state("app", "running")
        n = 0
        for i in range(args.runs):
            if i:  # the last round spent the budget; a healthy period gives it back
                sup.wait_event(lambda e: e["proxy"] == "app" and e["event"] == "rearmed", 30,
                               "re-arm", after=n)
            n = len(sup.events())
            node = control.node_named("app")
            t0 = time.monotonic()
            control.admin("delete_node", id=node["id"])
            decided = control.wait_event(lambda e: e["kind"] == "node_deleted" and e["node"] == node["id"],
                                         5, "the delete", since=t0 - 1)
            seen = sup.wait_state("app", "recovering", 30, after=n)
            back = sup.wait_state("app", "running", 60, after=n)
            detect.append(seen["t"] - decided["t"])
            recover.append(back["t"] - decided["t"])
        assert sup.status()["app"]["state"] == "running"
    finally:
        sup.stop()
        control.close()

    def fmt(xs: list[float]) -> str:
        return (f"median {statistics.median(xs) * 1000:.0f} ms "
                f"(min {min(xs) * 1000:.0f}, max {max(xs) * 1000:.0f}, n={len(xs)})")
    print(f"node deleted -> supervisor state change (detection): {fmt(detect)}")
    print(f"node deleted -> proxy running again (recovery):      {fmt(recover)}")


if __name__ == "__main__":
    main()
