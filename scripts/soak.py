"""The memory soak behind scripts/soak (run it through that wrapper: it sets up,
installs matplotlib and enters the private network namespace).

A real `ts-supervisor run` with N embedded proxies (the default peers policy:
proxies see client nodes, not each other), each serving a local HTTP service,
runs for hours under light churn, one step every `--churn` seconds, in a fixed
cycle: a client peer joins (a real tailscaled with an ephemeral key, which
fetches through a seeded-random proxy), a proxy restarts, a second client joins,
a proxy is recovered (a wipe and a fresh login), a client leaves, a restart, the
other client leaves, a recovery. Each step waits until the fleet is back (the
proxy `running`, the fetch answered), so a sample never lands mid-step.

Every `--sample` seconds it records (DIR/soak.csv, one row each, written as it
goes): the supervisor's RSS, CPU and open fds (psutil, from outside); its
asyncio tasks (the `process` IPC command, from inside); the PSS of its children
summed per kind (tailscaled, tailscale CLI runs; psutil memory_full_info, i.e.
/proc/PID/smaps_rollup), and the metrics endpoint is scraped like Prometheus would.

At the end it fits a least-squares line to each series after the warm-up
(`--warmup` minutes, at most a quarter of the run) and prints the slope per
hour with its 95 % confidence interval, against the targets of issue 14 (the
slope's upper bound under 0.5 MiB/h for the supervisor, 5 MiB/h for all
children; fds and tasks flat: under 1 per hour). It writes DIR/soak.png (each
series and its fitted line) and DIR/soak.json (the figures). The interval
treats the samples as independent; a minute apart under churn they are not
quite, so read a bound near its target with that in mind. The embedded control
runs inside the supervisor, so its fds and tasks step with the client peers
online (0 to 2, the CSV's `clients`); over hours the fit averages the steps.
"""
from __future__ import annotations

import argparse
import csv
import http.server
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from scripts import benchlib
from supervisor import ipc
from supervisor import tailscale as ts
from supervisor.control.cli import AdminClient
from tests.harness import Node, curl_via, free_port, wait_for
from tests.supervisor_harness import ROOT, SupervisorProc

BODY = "hello from the service behind the soak's proxies\n"
CYCLE = ("join", "restart", "join", "recover", "leave", "restart", "leave", "recover")
MAX_CLIENTS = 2
MIB = 2**20
STEP_BOUND = 120.0  # s a churn step may take before it counts as failed
SERIES = (  # (CSV column, label, unit, target for the slope's upper bound per hour)
    ("supervisor_rss_mib", "supervisor RSS", "MiB", 0.5),
    ("children_pss_mib", "children PSS, all", "MiB", 5.0),
    ("tailscaled_pss_mib", "  tailscaled", "MiB", None),
    ("cli_pss_mib", "  tailscale CLI runs", "MiB", None),
    ("other_pss_mib", "  other children", "MiB", None),
    ("supervisor_fds", "supervisor open fds", "fds", 1.0),
    ("supervisor_tasks", "supervisor asyncio tasks", "tasks", 1.0),
)
COLUMNS = ("minute", "hours", "warmup", "running", "clients", "supervisor_rss_mib", "supervisor_cpu_pct",
           "supervisor_fds", "supervisor_tasks", "tailscaled_pss_mib", "tailscaled_n", "cli_pss_mib",
           "cli_n", "other_pss_mib", "other_n", "children_pss_mib", "metrics_ok", "churn")


# -- the fit (pure; tests/unit/test_soak_fit.py) -------------------------------------------------

# Student's t, two-sided 95 % (0.975 quantile), by degrees of freedom: any statistics table,
# e.g. NIST/SEMATECH e-Handbook of Statistical Methods, 1.3.6.7.2 "Critical values of t".
T95 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 6: 2.4469, 7: 2.3646, 8: 2.3060,
       9: 2.2622, 10: 2.2281, 11: 2.2010, 12: 2.1788, 13: 2.1604, 14: 2.1448, 15: 2.1314,
       16: 2.1199, 17: 2.1098, 18: 2.1009, 19: 2.0930, 20: 2.0860, 21: 2.0796, 22: 2.0739,
       23: 2.0687, 24: 2.0639, 25: 2.0595, 26: 2.0555, 27: 2.0518, 28: 2.0484, 29: 2.0452,
       30: 2.0423, 40: 2.0211, 50: 2.0086, 60: 2.0003, 80: 1.9901, 100: 1.9840, 120: 1.9799,
       200: 1.9719, 500: 1.9647, 1000: 1.9623}
Z975 = 1.9600  # the limit for infinitely many degrees of freedom


def t95(df: int) -> float:
    """The two-sided 95 % critical value of Student's t with `df` degrees of freedom:
    from T95, between its rows linear in 1/df (error under 0.001), beyond 1000 toward
    the normal 1.96. ValueError for df < 1."""
    if df < 1:
        raise ValueError(f"want at least 1 degree of freedom, got {df}")
    if df in T95:
        return T95[df]
    rows = sorted(T95)
    below = max(r for r in rows if r < df)
    above = min((r for r in rows if r > df), default=None)
    hi_inv, hi_t = (1 / above, T95[above]) if above else (0.0, Z975)
    lo_inv, lo_t = 1 / below, T95[below]
    return hi_t + (lo_t - hi_t) * (1 / df - hi_inv) / (lo_inv - hi_inv)


@dataclass(frozen=True)
class Fit:
    """A least-squares line y = intercept + slope * x, with the 95 % confidence interval
    [low, high] of the slope (Student's t, n - 2 degrees of freedom), over n points."""

    slope: float
    intercept: float
    low: float
    high: float
    n: int


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> Fit:
    """Ordinary least squares of ys on xs. The slope's standard error is
    sqrt(SSE / (n - 2) / Sxx); the interval is slope -/+ t95(n - 2) times it.
    ValueError for fewer than 3 points, unequal lengths or all xs equal."""
    n = len(xs)
    if n != len(ys):
        raise ValueError(f"{n} xs but {len(ys)} ys")
    if n < 3:
        raise ValueError(f"a slope's interval needs at least 3 points, got {n}")
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("all xs are equal: no slope")
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    sse = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    half = t95(n - 2) * math.sqrt(sse / (n - 2) / sxx)
    return Fit(slope, intercept, slope - half, slope + half, n)


def child_kind(cmdline: Sequence[str]) -> str:
    """Which kind of child a command line is: "tailscaled", "tailscale CLI" (up, serve,
    set ... runs), or "other"."""
    if not cmdline:
        return "other"
    base = os.path.basename(cmdline[0])
    if base == "tailscaled":
        return "tailscaled"
    if base == "tailscale":
        return "tailscale CLI"
    return "other"


# -- the fleet and its churn ---------------------------------------------------------------------


class _Service(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        data = BODY.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@dataclass
class Churn:
    """The churn steps, in CYCLE order, on proxies picked by a seeded RNG."""

    sup: SupervisorProc
    bins: ts.Binaries
    names: list[str]
    root: Path
    rng: random.Random
    admin: AdminClient | None = None
    clients: list[tuple[Node, Path]] = field(default_factory=list)
    done: dict[str, int] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    step_no: int = 0

    def step(self) -> str:
        """Run the next step of the cycle; returns its one-line description. A step that
        goes wrong is recorded in `failed` (the soak goes on: it measures, it does not judge)."""
        kind = CYCLE[self.step_no % len(CYCLE)]
        self.step_no += 1
        if kind == "join" and len(self.clients) >= MAX_CLIENTS:
            kind = "leave"
        if kind == "leave" and not self.clients:
            kind = "join"
        name = self.rng.choice(self.names)
        try:
            what = getattr(self, kind)(name)
            self.done[kind] = self.done.get(kind, 0) + 1
        except (AssertionError, OSError, RuntimeError, subprocess.SubprocessError) as e:  # Timeout, IPCError too
            what = f"{kind} {name}: FAILED {str(e).splitlines()[0][:160]}"
            self.failed.append(what)
        return what

    def _proxy_op(self, cmd: str, name: str) -> str:
        n = len(self.sup.events())
        answer = ipc.call(self.sup.data_dir, cmd, name=name)
        if not answer.get("ok"):
            raise RuntimeError(f"{cmd} {name}: {answer.get('error')}")
        self.sup.wait_state(name, "running", STEP_BOUND, after=n)
        return f"{cmd} {name}"

    def restart(self, name: str) -> str:
        return self._proxy_op("restart", name)

    def recover(self, name: str) -> str:
        return self._proxy_op("recover", name)

    def join(self, name: str) -> str:
        if self.admin is None:
            self.admin = AdminClient.from_data_dir(self.sup.data_dir / "control")
        i = self.done.get("join", 0)
        statedir = self.root / f"client{i}"
        node = Node(bins=self.bins, statedir=statedir, control_url=self.admin.url, socks5_port=free_port())
        node.start()
        self.clients.append((node, statedir))
        node.up(self.admin.create_key(ephemeral=True)["secret"], f"client{i}", timeout=60)
        wait_for(lambda: curl_via(node.socks5_port, f"http://{name}.tailnet.test/") == BODY, STEP_BOUND,
                 f"client{i} fetching through {name}", interval=0.5)
        return f"client{i} joined, fetched through {name}"

    def leave(self, name: str) -> str:
        node, statedir = self.clients.pop(0)
        node.kill()
        shutil.rmtree(statedir, ignore_errors=True)
        return f"{statedir.name} left (its ephemeral node is reaped by the control)"

    def close(self) -> None:
        while self.clients:
            self.leave("")


# -- sampling ---------------------------------------------------------------------------------------


@dataclass
class Sampler:
    sup: SupervisorProc
    metrics_url: str
    last_cpu: tuple[float, float] | None = None  # (cpu seconds, monotonic)

    def sample(self) -> dict[str, Any]:
        """One row's figures (without the time columns)."""
        assert self.sup.proc is not None
        me = psutil.Process(self.sup.proc.pid)
        with me.oneshot():
            rss, fds, cpu = me.memory_info().rss, me.num_fds(), me.cpu_times()
        now, cpu_s = time.monotonic(), cpu.user + cpu.system
        cpu_pct = None
        if self.last_cpu is not None:
            cpu_pct = (cpu_s - self.last_cpu[0]) / (now - self.last_cpu[1]) * 100
        self.last_cpu = (cpu_s, now)
        pss = {"tailscaled": [0, 0], "tailscale CLI": [0, 0], "other": [0, 0]}
        for child in me.children(recursive=True):
            try:
                kind = child_kind(child.cmdline())
                pss[kind][0] += child.memory_full_info().pss
                pss[kind][1] += 1
            except psutil.Error:
                continue  # exited meanwhile
        tasks = ipc.call(self.sup.data_dir, "process").get("tasks")
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=10) as r:
                metrics_ok = int(r.status == 200 and bool(r.read()))
        except OSError:
            metrics_ok = 0
        running = sum(1 for p in self.sup.status().values() if p["state"] == "running")
        return {"running": running, "supervisor_rss_mib": rss / MIB,
                "supervisor_cpu_pct": "" if cpu_pct is None else round(cpu_pct, 3),
                "supervisor_fds": fds, "supervisor_tasks": tasks,
                "tailscaled_pss_mib": pss["tailscaled"][0] / MIB, "tailscaled_n": pss["tailscaled"][1],
                "cli_pss_mib": pss["tailscale CLI"][0] / MIB, "cli_n": pss["tailscale CLI"][1],
                "other_pss_mib": pss["other"][0] / MIB, "other_n": pss["other"][1],
                "children_pss_mib": sum(v[0] for v in pss.values()) / MIB, "metrics_ok": metrics_ok}


# -- report -----------------------------------------------------------------------------------------


def fits(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per series: its slope per hour, 95 % interval and target verdict, over the rows after
    the warm-up (all rows if fewer than 3 are left)."""
    kept = [r for r in rows if not r["warmup"]]
    kept = kept if len(kept) >= 3 else rows
    out = {}
    for col, label, unit, target in SERIES:
        pts = [(r["hours"], float(r[col])) for r in kept if r[col] not in ("", None)]
        try:
            f = fit_line([p[0] for p in pts], [p[1] for p in pts])
        except ValueError as e:
            out[col] = {"label": label, "unit": unit, "error": str(e)}
            continue
        ys = [p[1] for p in pts]
        out[col] = {"label": label, "unit": unit, "slope_per_h": f.slope, "low": f.low, "high": f.high,
                    "intercept": f.intercept, "n": f.n, "first": ys[0], "last": ys[-1],
                    "min": min(ys), "max": max(ys), "target_per_h": target,
                    "pass": None if target is None else f.high < target}
    return out


def report(summary: dict[str, Any]) -> str:
    s = summary
    lines = [f"soak: {s['proxies']} proxies, {s['hours']:.2f} h after all were running "
             f"({s['samples']} samples every {s['sample_s']:g} s; the first {s['warmup_min']:g} min are "
             f"warm-up, left out of the fits); {s['version']}, {s['cores']} cores",
             "churn: " + (", ".join(f"{k} x{v}" for k, v in sorted(s["churn_done"].items())) or "none")
             + (f"; {len(s['churn_failed'])} FAILED steps" if s["churn_failed"] else ""),
             *[f"  {x}" for x in s["churn_failed"]], "",
             f"{'series':<28}{'first':>10}{'last':>10}{'slope / h':>12}{'95% interval / h':>24}"
             f"{'target':>12}  result"]
    for col, _, _, _ in SERIES:
        d = s["fits"][col]
        if "error" in d:
            lines.append(f"{d['label']:<28}{'(' + d['error'] + ')':>40}")
            continue
        target = "" if d["target_per_h"] is None else f"< {d['target_per_h']:g}"
        verdict = "" if d["pass"] is None else ("PASS" if d["pass"] else "MISS")
        interval = f"[{d['low']:+.3f}, {d['high']:+.3f}]"
        lines.append(f"{d['label']:<28}{d['first']:>10.2f}{d['last']:>10.2f}{d['slope_per_h']:>+12.3f}"
                     f"{interval:>24}{target:>12}  {verdict}")
    lines.append("(MiB per hour for memory; fds and tasks per hour; PASS: the interval's upper bound "
                 "is under the target)")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    hours = [r["hours"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    kinds = [c for c in ("tailscaled_pss_mib", "cli_pss_mib", "other_pss_mib")
             if any(float(r[c]) for r in rows)]
    panels = ((axes[0][0], ["supervisor_rss_mib"], "supervisor RSS", "MiB"),
              (axes[0][1], ["children_pss_mib", *(kinds if len(kinds) > 1 else [])], "children PSS", "MiB"),
              (axes[1][0], ["supervisor_fds"], "supervisor open fds", "fds"),
              (axes[1][1], ["supervisor_tasks"], "supervisor asyncio tasks", "tasks"))
    for ax, cols, title, unit in panels:
        for col in cols:
            d = summary["fits"][col]
            ax.plot(hours, [float(r[col]) for r in rows], marker=".", linewidth=1, label=d["label"].strip())
            if "error" not in d and col == cols[0]:  # the fit of the panel's main series
                xs = [hours[0], hours[-1]]
                ax.plot(xs, [d["intercept"] + d["slope_per_h"] * x for x in xs], linestyle="--", linewidth=1,
                        label=f"fit {d['slope_per_h']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] {unit}/h")
        warm = [r["hours"] for r in rows if r["warmup"]]
        if warm:
            ax.axvspan(hours[0], max(warm), color="grey", alpha=0.15, label="warm-up (not fitted)")
        ax.set_title(title)
        ax.set_xlabel("hours")
        ax.set_ylabel(unit)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"soak: {summary['proxies']} proxies, {summary['hours']:.2f} h, churn every "
                 f"{summary['churn_s']:g} s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, bins: ts.Binaries, root: Path) -> dict[str, Any]:
    duration = args.minutes * 60 if args.minutes is not None else args.hours * 3600
    warmup = min(args.warmup * 60, duration / 4)
    service = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Service)
    threading.Thread(target=service.serve_forever, daemon=True).start()
    metrics_port = free_port()
    sup = SupervisorProc(root / "conf.d", root / "data",
                         settings={"metrics": f"127.0.0.1:{metrics_port}",
                                   "backoff_initial": 1.0})  # the default (the harness's is 0.2)
    names = [f"p{i:03d}" for i in range(args.proxies)]
    for name in names:
        sup.write_proxy(name, login_server="embedded",
                        serve=[{"port": 80, "target": f"http://127.0.0.1:{service.server_address[1]}"}])
    churn = Churn(sup, bins, names, root / "clients", random.Random(args.seed))
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / "soak.csv"
    rows: list[dict[str, Any]] = []
    try:
        t_start = time.monotonic()
        sup.start()
        for name in names:
            sup.wait_state(name, "running", 60 + 2 * args.proxies)
        print(f"all {args.proxies} proxies running after {time.monotonic() - t_start:.1f} s; "
              f"soaking {duration / 3600:.2f} h", flush=True)
        sampler = Sampler(sup, f"http://127.0.0.1:{metrics_port}/metrics")
        t0 = time.monotonic()
        next_sample, next_churn = t0, t0 + args.churn / 2
        pending: list[str] = []
        with open(csv_path, "w", newline="") as f:
            out = csv.DictWriter(f, COLUMNS)
            out.writeheader()
            while next_sample <= t0 + duration + 1e-6:
                if next_churn < next_sample:
                    time.sleep(max(0.0, next_churn - time.monotonic()))
                    what = churn.step()
                    pending.append(what)
                    print(f"  [{(time.monotonic() - t0) / 60:6.1f} min] {what}", flush=True)
                    next_churn += args.churn
                    continue
                time.sleep(max(0.0, next_sample - time.monotonic()))
                elapsed = next_sample - t0
                row = {"minute": round(elapsed / 60, 3), "hours": round(elapsed / 3600, 6),
                       "warmup": int(elapsed < warmup), "clients": len(churn.clients), **sampler.sample(),
                       "churn": "; ".join(pending)}
                pending = []
                rows.append(row)
                out.writerow(row)
                f.flush()
                print(f"  [{elapsed / 60:6.1f} min] sup RSS {row['supervisor_rss_mib']:.1f} MiB, "
                      f"fds {row['supervisor_fds']}, tasks {row['supervisor_tasks']}, children PSS "
                      f"{row['children_pss_mib']:.0f} MiB ({row['tailscaled_n']} tailscaled), "
                      f"{row['running']}/{args.proxies} running", flush=True)
                next_sample += args.sample
    finally:
        churn.close()
        sup.stop(timeout=120)
        service.shutdown()
        service.server_close()
    return {"proxies": args.proxies, "hours": duration / 3600, "sample_s": args.sample, "churn_s": args.churn,
            "warmup_min": warmup / 60, "samples": len(rows), "seed": args.seed, "churn_done": churn.done,
            "churn_failed": churn.failed, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(prog="scripts/soak", formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=__doc__.split("\n\n")[0])
    ap.add_argument("--hours", type=float, default=2.0, help="how long to soak once all proxies run")
    ap.add_argument("--minutes", type=float, default=None, help="instead of --hours, for a short check")
    ap.add_argument("--proxies", type=int, default=50, help="how many proxies run (embedded control, default peers policy)")
    ap.add_argument("--sample", type=float, default=60.0, help="seconds between samples")
    ap.add_argument("--churn", type=float, default=150.0, help="seconds between churn steps")
    ap.add_argument("--warmup", type=float, default=10.0,
                    help="minutes left out of the fits (at most a quarter of the run)")
    ap.add_argument("--seed", type=int, default=1, help="seeds which proxy each churn step picks")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out", help="where soak.csv, soak.png and soak.json go")
    ap.add_argument("--version", default=None, help="tailscale version under .tools/")
    args = ap.parse_args()
    if min(args.sample, args.churn) <= 0 or args.proxies < 1:
        ap.error("--sample and --churn must be positive, --proxies at least 1")
    if (args.minutes if args.minutes is not None else args.hours) <= 0 or args.warmup < 0:
        ap.error("--hours (or --minutes) must be positive and --warmup not negative")
    benchlib.enter("soak")
    if args.version:
        os.environ["TS_SUPERVISOR_TAILSCALE_VERSION"] = args.version  # the supervisor child too
    bins = ts.Binaries.locate(version=args.version)
    root = Path(tempfile.mkdtemp(prefix="soak-"))
    started = time.monotonic()
    try:
        result = run(args, bins, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = result.pop("rows")
    summary = {**result, "version": bins.version(), "cores": len(os.sched_getaffinity(0)),
               "elapsed_s": time.monotonic() - started, "fits": fits(rows)}
    (args.out / "soak.json").write_text(json.dumps(summary, indent=2))
    if len(rows) >= 2:
        plot(rows, summary, args.out / "soak.png")
    print()
    print(report(summary))
    wrote = [args.out / "soak.csv", *([args.out / "soak.png"] if len(rows) >= 2 else []), args.out / "soak.json"]
    print(f"\nwrote {', '.join(map(str, wrote))} ({summary['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    main()
