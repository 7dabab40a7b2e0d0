"""The soak behind scripts/chaos (run it through that wrapper: it sets up and
enters the private network namespace).

A real `ts-supervisor run` with M proxies against the project's control; each
round injects one fault chosen by a seeded RNG (the same seed gives the same
sequence), waits until every proxy is `running` or `failed` with a reason,
and checks the invariants:
  orphans      tailscale processes that are not the supervisor's children
               (during the run), or that outlive it (at the end)
  false wipes  a statedir removed although its proxy had no auth failure or
               corrupt state (a marker file in each statedir tells)
  loops        more than one wipe in one incident, or a failed proxy with a
               live tailscaled
Exit status 1 on any violation.
"""
from __future__ import annotations

import argparse
import http.server
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from supervisor import ipc
from tests.fixtures_control import ControlThread
from tests.harness import Timeout, wait_for
from tests.supervisor_harness import SupervisorProc

SETTLE_BOUND = 120.0  # every proxy running or failed within this after a fault ends
MARKER = ".chaos-marker"


@dataclass
class Tally:
    injected: int = 0
    wipes: int = 0
    false_wipes: int = 0
    orphans: int = 0
    loops: int = 0
    settle: list[float] = field(default_factory=list)


class Soak:
    def __init__(self, root: Path, proxies: int, rng: random.Random) -> None:
        self.root = root
        self.rng = rng
        self.control = ControlThread(root / "control", ephemeral_reap_after=0.0)
        self.names = [f"p{i:02d}" for i in range(proxies)]
        self.ephemeral = {n for i, n in enumerate(self.names) if i % 5 == 4}
        self.keys: dict[str, dict[str, Any]] = {}
        self.secrets: list[str] = []
        self.generation: Counter[str] = Counter()
        self.sup = SupervisorProc(root / "conf.d", root / "data", settings={
            "healthy_period": 2.0, "hang_timeout": 5.0, "backoff_max": 5.0,
            "start_limit": 5, "start_window": 60.0})
        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.tally: dict[str, Tally] = defaultdict(Tally)
        self.violations: list[str] = []

    # -- setup -----------------------------------------------------------------

    def write(self, name: str) -> None:
        """(Re)write a proxy's file with a fresh key file: a config change re-arms it."""
        self.generation[name] += 1
        key = self.control.create_key(reusable=True, ephemeral=name in self.ephemeral)
        self.keys[name] = key
        self.secrets.append(key["secret"])
        path = self.root / "keys" / f"{name}-{self.generation[name]}.secret"
        path.parent.mkdir(exist_ok=True)
        path.write_text(key["secret"])
        self.sup.write_proxy(name, hostname=name, target=f"http://127.0.0.1:{self.http.server_port}",
                             serve="http", port=80, login_server=self.control.url,
                             auth_key_file=str(path), ephemeral=name in self.ephemeral)

    def statedir(self, name: str) -> Path:
        return self.sup.data_dir / "proxies" / name / "state"

    def mark(self) -> None:
        for n in self.names:
            if self.statedir(n).is_dir():
                (self.statedir(n) / MARKER).write_text("x")

    # -- observation -------------------------------------------------------------

    def settled(self) -> dict[str, dict[str, Any]] | None:
        try:
            st = self.sup.status()
        except (OSError, ipc.NotRunning):
            return None
        if len(st) == len(self.names) and all(
                p["state"] == "running" or (p["state"] == "failed" and p["last_error"])
                for p in st.values()):
            return st
        return None

    def our_processes(self) -> list[psutil.Process]:
        out = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if str(self.sup.data_dir) in cmd and "tailscale" in cmd and "supervisor" not in cmd:
                out.append(p)
        return out

    def check(self, fault: str, target: str, allowed_wipes: set[str], n_events: int) -> None:
        t = self.tally[fault]
        events = self.sup.events()[n_events:]
        wiped = Counter(e["proxy"] for e in events if e["event"] == "wiped")
        t.wipes += sum(wiped.values())
        for name, count in wiped.items():
            if count > 1:
                t.loops += 1
                self.violations.append(f"{fault}: {name} wiped {count} times in one incident")
        for n in self.names:
            gone = self.statedir(n).is_dir() and not (self.statedir(n) / MARKER).exists()
            if (gone or wiped[n]) and n not in allowed_wipes:
                t.false_wipes += 1
                self.violations.append(f"{fault} on {target}: {n}'s statedir was wiped")
        st = self.sup.status()
        kids = {p.pid for p in self.sup.children()}
        for p in self.our_processes():
            if p.pid not in kids and p.status() != psutil.STATUS_ZOMBIE:
                t.orphans += 1
                self.violations.append(f"{fault}: orphan pid {p.pid} {' '.join(p.cmdline()[:2])}")
        for name, p in st.items():
            if p["state"] == "failed" and p["pid"] is not None:
                t.loops += 1
                self.violations.append(f"{fault}: {name} failed but has pid {p['pid']}")

    # -- faults: each returns the proxies allowed to be wiped ------------------------

    def _node_id(self, name: str) -> int:
        """The proxy's current node: after a corrupt-state wipe the old one stays, offline."""
        return max(n["id"] for n in self.control.nodes() if n["hostname"] == name)

    def _pid(self, name: str) -> int:
        return self.sup.status()[name]["pid"]

    def kill9_tailscaled(self, name: str) -> set[str]:
        os.kill(self._pid(name), signal.SIGKILL)
        return {name} & self.ephemeral  # an ephemeral node is reaped: stale state

    def kill9_serve(self, name: str) -> set[str]:
        sdir = str(self.statedir(name))
        serve = next(p for p in self.sup.children()
                     if "serve" in p.cmdline() and any(sdir in a for a in p.cmdline()))
        serve.kill()
        return set()

    def sigstop_tailscaled(self, name: str) -> set[str]:
        os.kill(self._pid(name), signal.SIGSTOP)
        return {name} & self.ephemeral

    def delete_node(self, name: str) -> set[str]:
        self.control.admin("delete_node", id=self._node_id(name))
        return {name}

    def expire_node(self, name: str) -> set[str]:
        self.control.admin("expire_node", id=self._node_id(name))
        return set()

    def revoke_and_delete(self, name: str) -> set[str]:
        """Ends in `failed`; then the operator gives it a new key (a config change)."""
        self.control.admin("revoke_key", id=self.keys[name]["id"])
        self.control.admin("delete_node", id=self._node_id(name))
        wait_for(lambda: self.sup.status()[name]["state"] == "failed", SETTLE_BOUND, f"{name} failed")
        self.write(name)
        return {name}

    def control_down(self, name: str) -> set[str]:
        self.control.stop()
        time.sleep(self.rng.uniform(10, 60))  # the outage itself
        self.control.start()
        return set()

    def control_500(self, name: str) -> set[str]:
        self.control.admin("set_fault", status=500)
        time.sleep(self.rng.uniform(5, 30))
        self.control.admin("set_fault", status=None)
        return set()

    def corrupt_state(self, name: str) -> set[str]:
        self.sup.kill9()
        (self.statedir(name) / "tailscaled.state").write_bytes(self.rng.choice([b"", b'{"_machin']))
        self.sup.start()
        return {name} | self.ephemeral

    def kill9_supervisor(self, name: str) -> set[str]:
        self.sup.kill9()
        self.sup.start()
        return set(self.ephemeral)

    def malformed_config(self, name: str) -> set[str]:
        path = self.sup.config_dir / f"{name}.toml"
        good = path.read_text()
        path.write_text('hostname = "broken\n')
        self.sup.proc.send_signal(signal.SIGHUP)
        time.sleep(3)  # a config that stays broken for a while
        path.write_text(good)
        self.sup.proc.send_signal(signal.SIGHUP)
        return set()

    REACTS = {"delete_node", "corrupt_state", "expire_node", "kill9_tailscaled", "kill9_serve",
              "sigstop_tailscaled"}
    FAULTS = ["kill9_tailscaled", "kill9_serve", "sigstop_tailscaled", "delete_node", "expire_node",
              "revoke_and_delete", "control_down", "control_500", "corrupt_state",
              "kill9_supervisor", "malformed_config"]

    # -- the run ---------------------------------------------------------------------

    def run(self, minutes: float) -> None:
        for n in self.names:
            self.write(n)
        self.sup.start()
        wait_for(self.settled, SETTLE_BOUND, "every proxy running")
        deadline = time.monotonic() + minutes * 60
        round_no = 0
        while time.monotonic() < deadline:
            round_no += 1
            fault = self.rng.choice(self.FAULTS)
            target = self.rng.choice(self.names)
            time.sleep(2.5)  # > healthy_period: the last incident's budget re-arms
            self.mark()
            n_events = len(self.sup.events())
            t0 = time.monotonic()
            allowed = getattr(self, fault)(target)
            t1 = time.monotonic()
            try:
                wait_for(self.settled, SETTLE_BOUND, "every proxy running or failed")
                # a fault may take a moment to be noticed: wait for the target's reaction
                if fault in self.REACTS:
                    wait_for(lambda: self._reacted(target, n_events), SETTLE_BOUND, "the reaction")
                    wait_for(self.settled, SETTLE_BOUND, "every proxy running or failed")
            except Timeout as e:
                self.violations.append(f"round {round_no} {fault} on {target}: {e}")
            self.tally[fault].injected += 1
            self.tally[fault].settle.append(time.monotonic() - t1)
            self.check(fault, target, allowed, n_events)
            print(f"round {round_no:3d}: {fault:<18} on {target}: settled in "
                  f"{self.tally[fault].settle[-1]:5.1f} s (fault took {t1 - t0:4.1f} s)", flush=True)
        self.finish()

    def _reacted(self, target: str, n_events: int) -> bool:
        return any(e["proxy"] == target and e.get("state") in ("running", "failed")
                   for e in self.sup.events()[n_events:])

    def finish(self) -> None:
        st = self.sup.status()
        last_state: dict[str, str] = {}
        for e in self.sup.events():
            if e.get("state"):
                last_state[e["proxy"]] = e["state"]
        for name, p in st.items():
            if last_state.get(name) != p["state"]:
                self.violations.append(f"{name}: status {p['state']} but events.jsonl says {last_state.get(name)}")
        self.sup.stop()
        left = [p for p in self.our_processes() if p.status() != psutil.STATUS_ZOMBIE]
        if left:
            self.tally["(after stop)"].orphans += len(left)
            self.violations.append(f"{len(left)} tailscale processes outlived the supervisor")
        blobs = [f.read_bytes() for f in self.sup.data_dir.rglob("*")
                 if f.is_file() and not f.name.startswith("tailscaled.state") and f.suffix != ".sock"]
        blobs.append(self.sup.text().encode())
        leaked = [s for s in self.secrets if any(s.encode() in b for b in blobs)]
        if leaked:
            self.violations.append(f"{len(leaked)} auth keys appear in logs or output")

    def close(self) -> None:
        self.sup.stop()
        self.control.close()
        self.http.shutdown()


def print_table(tally: dict[str, Tally]) -> None:
    rows = [("fault", "injected", "wipes", "false wipes", "orphans", "loops", "max settle s", "median s")]
    total = Tally()
    for fault in sorted(tally):
        t = tally[fault]
        rows.append((fault, str(t.injected), str(t.wipes), str(t.false_wipes), str(t.orphans), str(t.loops),
                     f"{max(t.settle):.1f}" if t.settle else "-",
                     f"{statistics.median(t.settle):.1f}" if t.settle else "-"))
        for f in ("injected", "wipes", "false_wipes", "orphans", "loops"):
            setattr(total, f, getattr(total, f) + getattr(t, f))
        total.settle += t.settle
    rows.append(("total", str(total.injected), str(total.wipes), str(total.false_wipes),
                 str(total.orphans), str(total.loops),
                 f"{max(total.settle):.1f}" if total.settle else "-",
                 f"{statistics.median(total.settle):.1f}" if total.settle else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0 or i == len(rows) - 2:
            print("  ".join("-" * w for w in widths))


def main() -> int:
    ap = argparse.ArgumentParser(prog="scripts/chaos")
    ap.add_argument("--minutes", type=float, default=5)
    ap.add_argument("--proxies", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="chaos-"))
    soak = Soak(root, args.proxies, random.Random(args.seed))
    print(f"chaos: {args.proxies} proxies, {args.minutes:g} min, seed {args.seed}, data {root}", flush=True)
    try:
        soak.run(args.minutes)
    finally:
        soak.close()
    print()
    print_table(soak.tally)
    for v in soak.violations:
        print(f"VIOLATION: {v}")
    print("invariants: " + ("all hold" if not soak.violations else f"{len(soak.violations)} violated"))
    return 1 if soak.violations else 0


if __name__ == "__main__":
    sys.exit(main())
