"""The soak behind scripts/chaos (run it through that wrapper: it sets up and
enters the private network namespace).

A real `ts-supervisor run` with M proxies against the project's control; each
round injects one fault chosen by a seeded RNG (the same seed gives the same
sequence), waits until every proxy is `running` or `failed` with a reason,
then one reconcile period more (plus TRUTH_MARGIN), and checks the invariants:
  orphans      tailscale processes that are not the supervisor's children
               (during the run), or that outlive it (at the end)
  false wipes  a statedir removed although its proxy had no auth failure or
               corrupt state (a marker file in each statedir tells)
  loops        more than one wipe in one incident, or a failed proxy with a
               live tailscaled
  status truth every proxy that status calls `running` is, by its own
               tailscaled's LocalAPI (asked here, not through the supervisor):
               BackendState Running with addresses, logged in on the
               configured control, its configured hostname, and serving
               exactly the configured service. Conversely (while settling), a
               proxy the LocalAPI shows serving like that for longer than a
               reconcile period plus TRUTH_MARGIN is not left in a
               not-yet-running state (`stuck`).
Some faults change the node behind the supervisor's back, as an operator's
`tailscale` command would (serve reset, an extra service, another hostname,
`tailscale down`, a serve apply killed half-way): no child of the
supervisor's exits, so only its level-triggered reconcile (the IPN bus, or
its timer for the serve config) can put them right, within one reconcile
period.
Exit status 1 on any violation.
"""
from __future__ import annotations

import argparse
import asyncio
import http.server
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from supervisor import ipc, paths
from supervisor import tailscale as ts
from supervisor.reconcile import desired_service, normalize_control_url
from tests.fixtures_control import ControlThread
from tests.harness import Timeout, wait_for
from tests.supervisor_harness import SupervisorProc

SETTLE_BOUND = 120.0  # every proxy running or failed within this after a fault ends
MARKER = ".chaos-marker"
RECONCILE_PERIOD = 2.0  # s: the run's reconcile_period, small so a soak sees many periods
TRUTH_MARGIN = 3.0      # s on top of one period: an observe plus a serve reset and apply on 2 busy cores
LOCALAPI_TIMEOUT = 5.0  # s for the three LocalAPI answers of one proxy
NOT_YET = ("starting", "recovering", "degraded")  # states that must give way to `running` once serving


# -- the status-truth invariant (pure, tests/unit/test_chaos_invariant.py) ---------------------


@dataclass(frozen=True)
class Want:
    """What a proxy's config promises while status calls it `running`."""

    control_url: str              # normalized (reconcile.normalize_control_url)
    hostname: str
    services: frozenset[ts.Service]

    @classmethod
    def of(cls, cfg: Mapping[str, Any]) -> "Want":
        """From a proxy file's keys (login_server, hostname, serve, port, target)."""
        return cls(normalize_control_url(cfg.get("login_server")), str(cfg["hostname"]),
                   frozenset({desired_service(cfg["serve"], int(cfg["port"]), cfg["target"])}))


# a proxy's LocalAPI: (/status?peers=false, /prefs, /serve-config) decoded, or why it did not answer
Answers = tuple[Any, Any, Any] | str


def shortfalls(want: Want, answers: Answers) -> list[str]:
    """Each way the LocalAPI's answers fall short of serving as `want` says,
    in the LocalAPI's terms; [] means serving as configured."""
    if isinstance(answers, str):
        return [f"no answer ({answers})"]
    status, prefs, serve = (a if isinstance(a, dict) else {} for a in answers)
    out = []
    state = status.get("BackendState")
    if state != "Running":
        out.append(f"BackendState {state!r}")
    me = status.get("Self") if isinstance(status.get("Self"), dict) else {}
    if state == "Running" and not me.get("TailscaleIPs"):
        out.append("no Tailscale addresses")
    control = prefs.get("ControlURL")
    if normalize_control_url(control if isinstance(control, str) else "") != want.control_url:
        out.append(f"ControlURL {control!r}, configured {want.control_url}")
    if prefs.get("Hostname") != want.hostname:
        out.append(f"Hostname {prefs.get('Hostname')!r}, configured {want.hostname!r}")
    have = ts.serve_services(serve)
    if have != want.services:
        out.append(f"serves {_show(have)}, configured {_show(want.services)}")
    return out


def _show(services: frozenset[ts.Service]) -> str:
    return ", ".join(s.describe() for s in sorted(services)) or "nothing"


def untruth(name: str, before: Mapping[str, Any], after: Mapping[str, Any], found: list[str]) -> str | None:
    """The status-truth violation in one line, or None. `before` and `after`
    are the proxy's `status --json` entries taken just before and after its
    LocalAPI answers: it counts only if status said `running` on both sides,
    so a change that happens during the check is not blamed on the status."""
    if not found or before.get("state") != "running" or after.get("state") != "running":
        return None
    return (f"{name}: status says running (since {before.get('since')}), "
            f"LocalAPI says {'; '.join(found)}")


@dataclass
class StuckWatch:
    """The converse: a proxy whose LocalAPI has shown it serving as configured
    for more than `bound` s, seen at least every `max_gap` s, while status
    keeps it in a NOT_YET state. Reports each such episode once."""

    bound: float
    max_gap: float = 3.0
    _since: dict[str, tuple[float, float, bool]] = field(default_factory=dict)  # first, last seen, reported

    def see(self, name: str, state: str, serving: bool, now: float) -> str | None:
        if state not in NOT_YET or not serving:
            self._since.pop(name, None)
            return None
        first, last, reported = self._since.get(name, (now, now, False))
        if now - last > self.max_gap:  # not watched in between: start over
            first, reported = now, False
        stuck = now - first > self.bound and not reported
        self._since[name] = (first, now, reported or stuck)
        if stuck:
            return (f"{name}: status says {state} although its LocalAPI has shown it serving "
                    f"as configured for {now - first:.1f}s (> {self.bound:g}s)")
        return None


async def _ask(socket: Path) -> Answers:
    api = ts.LocalAPI(socket)
    try:
        async with asyncio.timeout(LOCALAPI_TIMEOUT):
            return (await api.get_json("/localapi/v0/status?peers=false"),
                    await api.get_json("/localapi/v0/prefs"),
                    await api.get_json("/localapi/v0/serve-config"))
    except (OSError, ts.LocalAPIError, asyncio.IncompleteReadError, TimeoutError) as e:
        return f"{type(e).__name__}: {e}"[:200]


def ask_localapi(sockets: Mapping[str, Path]) -> dict[str, Answers]:
    """Each proxy's LocalAPI answers, asked concurrently and directly."""
    async def all_() -> list[Answers]:
        return await asyncio.gather(*(_ask(s) for s in sockets.values()))
    return dict(zip(sockets, asyncio.run(all_())))


# -- the soak ----------------------------------------------------------------------------


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """The proxies' target. Quiet: the supervisor probes it every reconcile period."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class Tally:
    injected: int = 0
    wipes: int = 0
    false_wipes: int = 0
    orphans: int = 0
    loops: int = 0
    truth_checks: int = 0
    untruths: int = 0
    stuck: int = 0
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
            "start_limit": 5, "start_window": 60.0, "reconcile_period": RECONCILE_PERIOD})
        self.bins = ts.Binaries.locate()
        self.stuck = StuckWatch(bound=RECONCILE_PERIOD + TRUTH_MARGIN)
        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), QuietHandler)
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

    def want(self, name: str) -> Want:
        return Want.of(tomllib.loads((self.sup.config_dir / f"{name}.toml").read_text()))

    def socket(self, name: str) -> Path:
        return paths.proxy_socket(self.sup.data_dir, name)

    def settle(self, fault: str, what: str) -> None:
        """Wait until settled(); meanwhile watch the converse of status truth."""
        def done() -> dict[str, dict[str, Any]] | None:
            st = self.settled()
            if st is None:
                self.watch_stuck(fault)
            return st
        wait_for(done, SETTLE_BOUND, what, interval=0.5)

    def watch_stuck(self, fault: str) -> None:
        try:
            st = self.sup.status()
        except (OSError, ipc.NotRunning):
            return
        waiting = [n for n, p in st.items() if p["state"] in NOT_YET]
        answers = ask_localapi({n: self.socket(n) for n in waiting})
        now = time.monotonic()
        for n, p in st.items():
            serving = n in answers and not shortfalls(self.want(n), answers[n])
            v = self.stuck.see(n, p["state"], serving, now)
            if v:
                self.tally[fault].stuck += 1
                self.violations.append(f"{fault}: {v}; reason {p.get('reason')!r}\n{self.recent(n)}")

    def check_truth(self, fault: str) -> None:
        """Status truth, once the round has settled and one reconcile period has passed."""
        t = self.tally[fault]
        before = self.sup.status()
        running = [n for n, p in before.items() if p["state"] == "running"]
        answers = ask_localapi({n: self.socket(n) for n in running})
        after = self.sup.status()
        for n in running:
            t.truth_checks += 1
            v = untruth(n, before[n], after.get(n, {}), shortfalls(self.want(n), answers[n]))
            if v is None:
                continue
            t.untruths += 1
            time.sleep(RECONCILE_PERIOD + TRUTH_MARGIN)  # does it last? (said, not excused)
            again = shortfalls(self.want(n), ask_localapi({n: self.socket(n)})[n])
            state = self.sup.status()[n]["state"]
            self.violations.append(
                f"{fault}: {v}; {RECONCILE_PERIOD + TRUTH_MARGIN:g}s later status says {state}, "
                f"LocalAPI says {'; '.join(again) or 'serving as configured'}\n{self.recent(n)}")

    def recent(self, name: str, n: int = 12) -> str:
        """The proxy's last events, for a violation report."""
        evs = [e for e in self.sup.events() if e["proxy"] == name][-n:]
        return "\n".join(f"    {e.get('time', '')} {e['event']} {e.get('state') or ''} {e.get('reason', '')}"
                         for e in evs)

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

    # behind the supervisor's back: only a level-triggered reconcile notices these

    def _cli(self, name: str, *args: str) -> None:
        """A `tailscale` command on the proxy's socket, as an operator would run it."""
        r = subprocess.run([str(self.bins.tailscale), f"--socket={self.socket(name)}", *args],
                           env=ts.cli_env(), capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            last = (r.stdout + r.stderr).strip().splitlines()[-1:] or [f"exit {r.returncode}"]
            print(f"           (tailscale {' '.join(args)} on {name} failed: {last[0]})", flush=True)

    def serve_reset(self, name: str) -> set[str]:
        self._cli(name, "serve", "reset")
        return set()

    def serve_extra(self, name: str) -> set[str]:
        """A service nobody configured, added next to the configured one."""
        self._cli(name, "serve", "--bg", "--yes", "--tcp=2222", f"tcp://127.0.0.1:{self.http.server_port}")
        return set()

    def set_hostname(self, name: str) -> set[str]:
        self._cli(name, "set", f"--hostname=chaos-{name}")
        return set()

    def tailscale_down(self, name: str) -> set[str]:
        self._cli(name, "down")
        return {name} & self.ephemeral  # off the control: an ephemeral node is reaped at once

    def kill9_serve(self, name: str) -> set[str]:
        """Reset the serve config by hand, then SIGKILL the first `tailscale
        serve` child (reset or --bg) the supervisor starts to put it back: a
        failed, partial apply."""
        self._cli(name, "serve", "reset")
        sock = f"--socket={self.socket(name)}"

        def apply_child() -> psutil.Process | None:
            return next((p for p in self.sup.children()
                         if sock in (cmd := p.cmdline()) and "serve" in cmd), None)
        try:
            wait_for(apply_child, RECONCILE_PERIOD + TRUTH_MARGIN, "a serve child", interval=0.005).kill()
        except (Timeout, psutil.Error):
            print(f"           (no serve child of {name} seen to kill)", flush=True)
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

    REACTS = {"delete_node", "corrupt_state", "expire_node", "kill9_tailscaled", "sigstop_tailscaled"}
    FAULTS = ["kill9_tailscaled", "kill9_serve", "sigstop_tailscaled", "delete_node", "expire_node",
              "revoke_and_delete", "control_down", "control_500", "corrupt_state",
              "kill9_supervisor", "malformed_config",
              "serve_reset", "serve_extra", "set_hostname", "tailscale_down"]

    # -- the run ---------------------------------------------------------------------

    def run(self, minutes: float) -> None:
        for n in self.names:
            self.write(n)
        self.sup.start()
        self.settle("(start)", "every proxy running")
        self.check_truth("(start)")
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
            allowance = 0.0
            try:
                self.settle(fault, "every proxy running or failed")
                # a fault may take a moment to be noticed: wait for the target's reaction
                if fault in self.REACTS:
                    wait_for(lambda: self._reacted(target, n_events), SETTLE_BOUND, "the reaction")
                    self.settle(fault, "every proxy running or failed")
                # one reconcile period: what changed behind the supervisor's back is seen and put right
                allowance = RECONCILE_PERIOD + TRUTH_MARGIN
                time.sleep(allowance)
                self.settle(fault, "every proxy running or failed, a reconcile period later")
            except Timeout as e:
                self.violations.append(f"round {round_no} {fault} on {target}: {e}")
            self.tally[fault].injected += 1
            self.tally[fault].settle.append(time.monotonic() - t1 - allowance)
            self.check_truth(fault)
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


COUNTS = ("injected", "wipes", "false_wipes", "orphans", "loops", "truth_checks", "untruths", "stuck")


def print_table(tally: dict[str, Tally]) -> None:
    rows = [("fault", "injected", "wipes", "false wipes", "orphans", "loops", "truth checks", "untrue",
             "stuck", "max settle s", "median s")]
    total = Tally()
    for fault in sorted(tally):
        t = tally[fault]
        rows.append((fault, *(str(getattr(t, f)) for f in COUNTS),
                     f"{max(t.settle):.1f}" if t.settle else "-",
                     f"{statistics.median(t.settle):.1f}" if t.settle else "-"))
        for f in COUNTS:
            setattr(total, f, getattr(total, f) + getattr(t, f))
        total.settle += t.settle
    rows.append(("total", *(str(getattr(total, f)) for f in COUNTS),
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
    print(f"\n{sum(t.injected for t in soak.tally.values())} rounds; settle s = fault over -> every proxy "
          f"running or failed; truth checks after one reconcile period ({RECONCILE_PERIOD:g}s) "
          f"+ {TRUTH_MARGIN:g}s")
    print_table(soak.tally)
    for v in soak.violations:
        print(f"VIOLATION: {v}")
    print("invariants: " + ("all hold" if not soak.violations else f"{len(soak.violations)} violated"))
    return 1 if soak.violations else 0


if __name__ == "__main__":
    sys.exit(main())
