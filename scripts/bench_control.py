"""The figures behind scripts/bench-control (run it through that wrapper: it
sets up and enters the private network namespace)."""
from __future__ import annotations

import argparse
import concurrent.futures
import resource
import statistics
import tempfile
import time
from pathlib import Path

import psutil

from supervisor import tailscale as ts
from tests.fixtures_control import ControlThread
from tests.harness import Node


def launch_to_running(bins: ts.Binaries, control: ControlThread, statedir: Path, name: str) -> tuple[float, Node]:
    """Seconds from spawning tailscaled to BackendState Running (including `up`)."""
    node = Node(bins=bins, statedir=statedir, control_url=control.url)
    key = control.create_key()["secret"]
    node.start()
    node.up(key, name, timeout=60)
    node.wait_state(ts.BackendState.RUNNING, timeout=60)
    return time.monotonic() - node.started_at, node


def main() -> None:
    ap = argparse.ArgumentParser(prog="scripts/bench-control")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--fleet", type=int, default=50)
    ap.add_argument("--version", default=None)
    args = ap.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    bins = ts.Binaries.locate(version=args.version)
    root = Path(tempfile.mkdtemp(prefix="bench-control-"))
    control = ControlThread(root / "control")
    nodes: list[Node] = []
    try:
        times = []
        for i in range(args.runs):
            t, node = launch_to_running(bins, control, root / f"single{i}", f"single{i}")
            times.append(t)
            node.kill()
            control.admin("delete_node", id=control.node_named(f"single{i}")["id"])
        print(f"tailscale {bins.version()}: fresh node launch -> Running, median of {args.runs}: "
              f"{statistics.median(times) * 1000:.0f} ms "
              f"(min {min(times) * 1000:.0f}, max {max(times) * 1000:.0f})", flush=True)

        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(args.fleet) as pool:
            futures = [pool.submit(launch_to_running, bins, control, root / f"fleet{i}", f"fleet{i}")
                       for i in range(args.fleet)]
            for f in concurrent.futures.as_completed(futures):
                nodes.append(f.result()[1])
        all_running = time.monotonic() - t0
        peers_seen = min(len(n.status().peers) for n in nodes)
        me = psutil.Process()
        ctl = next(t for t in me.threads() if t.id == control.thread.native_id)
        print(f"{args.fleet} nodes launched at once: all Running after {all_running:.2f} s; "
              f"every node sees {peers_seen} peers", flush=True)
        print(f"control thread CPU for all of the above: {ctl.user_time + ctl.system_time:.2f} s; "
              f"process RSS (control + harness) {me.memory_info().rss / 2**20:.0f} MiB", flush=True)
    finally:
        for n in nodes:
            n.kill()
        control.close()


if __name__ == "__main__":
    main()
