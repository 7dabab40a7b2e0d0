"""The figures behind scripts/bench-gomem (run it through that wrapper: it sets
up and enters the private network namespace).

Go's runtime knobs on the children: N real tailscaleds against the embedded
control, logged in with proxy keys (the peers policy the supervisor uses) and
serving one HTTP service each through `serve reset` + `serve --bg` (the
mechanism the supervisor uses; tailscaled keeps it in its state across
restarts). For each setting (GOGC, GOMEMLIMIT in tailscaled's environment),
every tailscaled is started afresh and measured:
  - start -> all Running with their serve config (wall s);
  - PSS/USS/RSS per proxy (/proc/PID/smaps_rollup) `--settle` s after that;
  - the tailscaleds' CPU (schedstat) over an idle window of `--idle` s;
  - a burst: a client peer joins (every proxy gets a netmap change) and
    fetches one page through each proxy; the tailscaleds' CPU from the
    client's start to the last answer, each fetch's latency, and PSS after.
Prints figures; asserts nothing about them.
"""
from __future__ import annotations

import argparse
import http.server
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts import benchlib
from supervisor import procs
from supervisor import tailscale as ts
from scripts.bench_serve import apply_b, cpu_s, desired, private_copy, services, smaps
from tests.fixtures_control import ControlThread
from tests.harness import LineLog, Node, free_port, socks5_connect, wait_for
from tests.supervisor_harness import ROOT

KNOBS = ("GOGC", "GOMEMLIMIT")
DEFAULT_SETTINGS = ("default,GOGC=50,GOGC=25,GOMEMLIMIT=8MiB,GOMEMLIMIT=12MiB,GOMEMLIMIT=16MiB,"
                    "GOGC=off+GOMEMLIMIT=8MiB,GOGC=off+GOMEMLIMIT=12MiB,GOGC=off+GOMEMLIMIT=16MiB")
TARGET_PSS_MIB = 12.0  # issue 14: children PSS per proxy at 50 proxies
BODY = b"gomem-ok\n"


def parse_setting(text: str) -> dict[str, str]:
    """"default" -> {}; "GOGC=off+GOMEMLIMIT=12MiB" -> both. Only Go's knobs."""
    if text == "default":
        return {}
    env = dict(part.split("=", 1) for part in text.split("+"))
    unknown = set(env) - set(KNOBS)
    if unknown:
        raise SystemExit(f"bench-gomem: setting {text!r}: only {', '.join(KNOBS)} may be set")
    return env


@dataclass
class GoNode(Node):
    """A harness Node whose tailscaled runs with exactly `go_env` of Go's knobs
    (whatever the supervisor's own default is, it is removed first)."""

    go_env: dict[str, str] | None = None

    def start(self) -> "GoNode":
        self.statedir.mkdir(parents=True, exist_ok=True)
        socks = f"127.0.0.1:{self.socks5_port}" if self.socks5_port else None
        argv, env = ts.tailscaled_command(self.bins, self.statedir,
                                          quiet_control_url=self.control_url, socks5_server=socks)
        env = {k: v for k, v in env.items() if k not in KNOBS} | (self.go_env or {})
        self.stderr, self.bus, self.started_at = LineLog(), [], time.monotonic()
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        threading.Thread(target=self._read_output, daemon=True).start()
        wait_for(lambda: self.call(self.api.request("GET", "/localapi/v0/status")), 30, "LocalAPI to answer")
        threading.Thread(target=self._follow_bus, daemon=True).start()  # as the supervisor follows it
        return self


class Backend(http.server.ThreadingHTTPServer):
    """The one upstream every proxy serves: answers BODY to any GET."""

    def __init__(self) -> None:
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Length", str(len(BODY)))
                self.end_headers()
                self.wfile.write(BODY)

            def log_message(self, *a: Any) -> None:
                pass
        super().__init__(("127.0.0.1", 0), H)
        self.daemon_threads = True
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def target(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def fetch(socks_port: int, ip: str, host: str) -> float:
    """One GET through a proxy's serve (port 80) from the client; seconds.
    `host`: the proxy's MagicDNS name (serve picks its handler by Host)."""
    t0 = time.perf_counter()
    with socks5_connect(socks_port, ip, 80, timeout=15) as s:
        s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    assert got.startswith(b"HTTP/1.1 200") and got.endswith(BODY), f"fetch via {ip}: {got[:80]!r}"
    return time.perf_counter() - t0


def running(n: Node, target: str) -> bool:
    s = n.status()
    return (s.backend_state == ts.BackendState.RUNNING and bool(s.tailscale_ips) and bool(s.dns_name)
            and services(n) == desired(target))


class Fleet:
    def __init__(self, bins: ts.Binaries, control: ControlThread, root: Path, size: int, tag: str,
                 backend: Backend) -> None:
        self.bins, self.control, self.root, self.size, self.tag = bins, control, root, size, tag
        self.target = backend.target
        self.nodes = [GoNode(bins=bins, statedir=root / f"n{i}", control_url=control.url) for i in range(size)]
        self.ips: list[tuple[str, str]] = []  # (IPv4, MagicDNS name) per proxy

    def start(self, go_env: dict[str, str]) -> float:
        """Start every tailscaled with `go_env`; seconds until all are Running and serving."""
        t0 = time.monotonic()
        for n in self.nodes:
            n.go_env = go_env
        with ThreadPoolExecutor(8) as ex:
            list(ex.map(lambda n: n.start(), self.nodes))
        for n in self.nodes:
            wait_for(lambda: running(n, self.target), 120, f"{n.statedir.name} Running and serving")
        return time.monotonic() - t0

    def login(self) -> None:
        """Fresh statedirs, logged in with a proxy key and serving via --bg once;
        later starts find the config in tailscaled's state."""
        key = self.control.create_key(reusable=True, proxy=True)["secret"]
        for n in self.nodes:
            n.go_env = {}
        with ThreadPoolExecutor(8) as ex:
            list(ex.map(lambda n: n.start(), self.nodes))
            list(ex.map(lambda x: x[1].up(key, f"{self.tag}-n{x[0]}", timeout=120), enumerate(self.nodes)))
        for n in self.nodes:
            wait_for(lambda: n.status().backend_state == ts.BackendState.RUNNING and n.status().dns_name,
                     120, f"{n.statedir.name} Running")
            apply_b(self.bins, n, self.target)
        self.ips = [(s.tailscale_ips[0], s.dns_name.rstrip(".")) for s in (n.status() for n in self.nodes)]

    def stop(self) -> None:
        with ThreadPoolExecutor(8) as ex:
            list(ex.map(lambda n: n.kill(), self.nodes))

    def pids(self) -> list[int]:
        return [n.proc.pid for n in self.nodes if n.proc]


def memory(pids: list[int], size: int) -> dict[str, float]:
    rows = [smaps(p) for p in pids]
    return {k: sum(r[k] for r in rows) / size / 1024 for k in ("pss", "uss", "rss")}  # MiB per proxy


def burst(fleet: Fleet, client_dir: Path, tag: str) -> dict[str, Any]:
    """A client peer joins and fetches through every proxy; the proxies'
    CPU s from its start to the last answer, and the fetch latencies."""
    pids = fleet.pids()
    c0, t0 = sum(cpu_s(p) for p in pids), time.monotonic()
    client = GoNode(bins=fleet.bins, statedir=client_dir, control_url=fleet.control.url,
                    socks5_port=free_port())
    try:
        client.start()
        client.up(fleet.control.create_key()["secret"], f"{tag}-client", timeout=60)
        client.wait_state(ts.BackendState.RUNNING, 60)
        lat = []
        for ip, host in fleet.ips:
            deadline = time.monotonic() + 30
            while True:  # the proxy may not have the client in its netmap yet
                try:
                    lat.append(fetch(client.socks5_port or 0, ip, host))
                    break
                except (OSError, AssertionError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        wall, cpu = time.monotonic() - t0, sum(cpu_s(p) for p in pids) - c0
    finally:
        client.kill()
        for n in fleet.control.nodes():
            if n["hostname"] == f"{tag}-client":
                fleet.control.admin("delete_node", id=n["id"])
        shutil.rmtree(client_dir, ignore_errors=True)
    lat.sort()
    return {"burst_s": wall, "burst_cpu_s": cpu, "fetch_median_ms": statistics.median(lat) * 1000,
            "fetch_p90_ms": lat[int(0.9 * (len(lat) - 1))] * 1000, "fetch_max_ms": lat[-1] * 1000}


def measure(fleet: Fleet, setting: str, settle: float, idle: float, tag: str) -> dict[str, Any]:
    go_env = parse_setting(setting)
    fleet.stop()
    start_s = fleet.start(go_env)
    pids = fleet.pids()
    c_start = sum(cpu_s(p) for p in pids)  # CPU of the whole start, up to now
    time.sleep(settle)
    mem = memory(pids, fleet.size)
    c0, t0 = sum(cpu_s(p) for p in pids), time.monotonic()
    time.sleep(idle)
    idle_cpu, idle_wall = sum(cpu_s(p) for p in pids) - c0, time.monotonic() - t0
    b = burst(fleet, fleet.root / f"client-{tag}", tag)
    after = memory(pids, fleet.size)
    for p in pids:  # the setting really reached every tailscaled
        env = dict(e.split("=", 1) for e in Path(f"/proc/{p}/environ").read_text().split("\0") if "=" in e)
        assert {k: env[k] for k in KNOBS if k in env} == go_env, f"pid {p} env {env}"
    return {"setting": setting, "start_s": start_s, "start_cpu_s": c_start,
            **{f"{k}_mib": v for k, v in mem.items()},
            "idle_cpu_ms_per_s": idle_cpu / idle_wall * 1000,  # all proxies together: thousandths of a core
            **b, **{f"after_burst_{k}_mib": v for k, v in after.items()}}


def table(rows: list[dict[str, Any]], settle: float, idle: float) -> str:
    lines = [f"Per proxy (tailscaled; no resident serve child: --bg), PSS/USS {settle:g} s after all Running; "
             f"idle CPU over {idle:g} s for all proxies (ms/s = thousandths of a core); burst = a client joins "
             "and fetches through each proxy",
             f"{'release':<8}{'N':>4} {'peers':<8}{'setting':<26}{'start':>7}{'PSS':>7}{'USS':>7}{'RSS':>7}"
             f"{'idle CPU':>10}{'burst CPU':>10}{'fetch med':>10}{'p90':>8}{'PSS after':>10}"]
    for r in rows:
        lines.append(f"{r['version']:<8}{r['size']:>4} {r['peers']:<8}{r['setting']:<26}{r['start_s']:>6.1f}s"
                     f"{r['pss_mib']:>7.2f}{r['uss_mib']:>7.2f}{r['rss_mib']:>7.1f}"
                     f"{r['idle_cpu_ms_per_s']:>6.1f}ms/s{r['burst_cpu_s']:>9.2f}s"
                     f"{r['fetch_median_ms']:>8.1f}ms{r['fetch_p90_ms']:>6.1f}ms{r['after_burst_pss_mib']:>10.2f}")
    for r in rows:
        if r["size"] == 50:
            ok = "meets" if r["pss_mib"] <= TARGET_PSS_MIB else "misses"
            lines.append(f"target: PSS <= {TARGET_PSS_MIB:g} MiB per proxy at 50: {r['version']} {r['setting']}: "
                         f"{r['pss_mib']:.2f} MiB, {ok}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(prog="scripts/bench-gomem", description=__doc__.split("\n\n")[0])
    ap.add_argument("--proxies", type=int, default=50)
    ap.add_argument("--versions", default="1.96.4", help="tailscale releases under .tools/")
    ap.add_argument("--settings", default=DEFAULT_SETTINGS)
    ap.add_argument("--settle", type=float, default=30.0, help="seconds between all Running and the PSS sample")
    ap.add_argument("--idle", type=float, default=20.0, help="seconds of the idle CPU window")
    ap.add_argument("--peers", choices=("clients", "all"), default="clients",
                    help="the embedded control's peers policy (all: each proxy sees the other N-1)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out")
    args = ap.parse_args()
    benchlib.enter("bench-gomem")
    procs.become_subreaper()
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    for s in settings:
        parse_setting(s)
    versions = [v.strip() for v in args.versions.split(",") if v.strip()]
    root = Path(tempfile.mkdtemp(prefix="bench-gomem-"))
    control = ControlThread(root / "control", peers=args.peers)
    backend = Backend()
    started, rows = time.monotonic(), []
    try:
        for version in versions:
            bins = private_copy(ts.Binaries.locate(version=version), root / f"bin-{version}")
            tag = f"g{version.replace('.', '')}"
            fleet = Fleet(bins, control, root / tag, args.proxies, tag, backend)
            print(f"{bins.version()}: {args.proxies} proxies logging in (peers: {args.peers}) ...", flush=True)
            try:
                fleet.login()
                for i, setting in enumerate(settings):
                    r = measure(fleet, setting, args.settle, args.idle, f"{tag}s{i}")
                    r.update(version=version, size=args.proxies, peers=args.peers)
                    rows.append(r)
                    print(f"  {version} {setting}: start {r['start_s']:.1f} s, PSS {r['pss_mib']:.2f} MiB, "
                          f"USS {r['uss_mib']:.2f} MiB per proxy, idle {r['idle_cpu_ms_per_s']:.1f} ms/s, "
                          f"burst {r['burst_cpu_s']:.2f} s CPU, fetch median {r['fetch_median_ms']:.1f} ms",
                          flush=True)
            finally:
                fleet.stop()
    finally:
        control.close()
        backend.shutdown()
        shutil.rmtree(root, ignore_errors=True)  # statedirs and the binaries' copy, also after a failure
    summary = {"rows": rows, "peers": args.peers, "settle_s": args.settle, "idle_s": args.idle,
               "cores": len(os.sched_getaffinity(0)), "elapsed_s": time.monotonic() - started}
    args.out.mkdir(exist_ok=True)
    (args.out / "bench-gomem.json").write_text(json.dumps(summary, indent=2))
    print()
    print(table(rows, args.settle, args.idle))
    print(f"\nwrote {args.out / 'bench-gomem.json'} ({summary['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    main()
