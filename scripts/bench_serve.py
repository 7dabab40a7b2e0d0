"""The figures behind scripts/bench-serve (run it through that wrapper: it sets
up and enters the private network namespace).

Three ways to give a node its serve config, on real tailscaleds against the
embedded control, for each release and fleet size:
  A  foreground: one long-lived `tailscale serve --http=80 TARGET` child per
     service; tailscaled keeps the config while the child's IPN-bus session lives;
  B  background: `tailscale serve reset`, then one `tailscale serve --bg --yes`
     per service; the CLI writes the config into tailscaled's state and exits;
  C  LocalAPI: one POST of the whole ipn.ServeConfig to /localapi/v0/serve-config.

For each: PSS/USS/RSS (/proc/PID/smaps_rollup) of tailscaled and of the serve
children, per proxy, `--settle` s after every node is Running and serving
(checked through the LocalAPI serve-config); the time and CPU of one apply;
and what happens on a partial failure, on a kill -9 of the parent and on a
tailscaled restart. Prints figures; asserts nothing about them.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from scripts import benchlib
from supervisor import procs
from supervisor import tailscale as ts
from tests.fixtures_control import ControlThread
from tests.harness import Node, wait_for
from tests.supervisor_harness import ROOT

OPTIONS = ("A", "B", "C")
LABEL = {"A": "A foreground child", "B": "B reset + --bg", "C": "C LocalAPI POST"}
PORT = 80


def target_for(i: int) -> str:
    return f"http://127.0.0.1:{8000 + i}"  # nothing needs to answer there


def desired(target: str) -> frozenset[ts.Service]:
    return frozenset({ts.Service(PORT, "/", "http", target)})


# -- measuring a process -----------------------------------------------------------------


def smaps(pid: int) -> dict[str, int]:
    """Rss, Pss and Uss (Private_Clean + Private_Dirty) of `pid`, in KiB."""
    got: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        k, _, v = line.partition(":")
        if v.strip().endswith("kB"):
            got[k] = int(v.split()[0])
    return {"rss": got["Rss"], "pss": got["Pss"], "uss": got["Private_Clean"] + got["Private_Dirty"]}


def cpu_s(pid: int) -> float:
    """On-CPU time of a live process's threads, in seconds, from each thread's
    schedstat (ns; /proc/PID/stat counts in 10 ms ticks, too coarse for one apply)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # the thread ended meanwhile
    return total / 1e9


def run_cli(argv: list[str], timeout: float = 30) -> tuple[int, str, float]:
    """Run one CLI child; (exit status, output, its user+system CPU s from wait4)."""
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, env=ts.cli_env())
    assert p.stdout is not None
    out = b""
    deadline = time.monotonic() + timeout
    while chunk := _read(p.stdout.fileno(), deadline):
        out += chunk
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    p.stdout.close()
    return p.returncode, out.decode(errors="replace"), ru.ru_utime + ru.ru_stime


def _read(fd: int, deadline: float) -> bytes:
    left = deadline - time.monotonic()
    if left <= 0 or not select.select([fd], [], [], left)[0]:
        raise TimeoutError("CLI child did not finish in time")
    return os.read(fd, 65536)


def error_line(out: str) -> str:
    """The CLI's `error: ...` line, else its last line."""
    lines = [l.strip() for l in out.splitlines() if l.strip()]
    return next((l for l in lines if l.startswith("error")), lines[-1] if lines else "")


def api_call(coro: Any) -> Any:
    return asyncio.run(coro)


def serve_config(node: Node) -> Any:
    return api_call(node.api.get_json("/localapi/v0/serve-config"))


def services(node: Node) -> frozenset[ts.Service]:
    return ts.serve_services(serve_config(node))


def post_config(node: Node, cfg: dict[str, Any]) -> None:
    api_call(node.api.request("POST", "/localapi/v0/serve-config", cfg))


def web_config(node: Node, ports_targets: list[tuple[int, str]]) -> dict[str, Any]:
    """The ipn.ServeConfig that `serve --bg --http=P T` builds, for several P."""
    host = node.status().dns_name
    return {"TCP": {str(p): {"HTTP": True} for p, _ in ports_targets},
            "Web": {f"{host}:{p}": {"Handlers": {"/": {"Proxy": t}}} for p, t in ports_targets}}


def private_copy(bins: ts.Binaries, where: Path) -> ts.Binaries:
    """The binaries copied to `where`: PSS splits a file page among every
    process that maps it, so tailscaleds run from the shared .tools/ copy by
    anyone else on this machine (other test runs) would lower our figures."""
    where.mkdir(parents=True)
    return ts.Binaries(tailscale=Path(shutil.copy2(bins.tailscale, where / "tailscale")),
                       tailscaled=Path(shutil.copy2(bins.tailscaled, where / "tailscaled")))


# -- the three options -------------------------------------------------------------------


@dataclass
class Foreground:
    """A long-lived `tailscale serve` child; ready once it says so."""

    proc: subprocess.Popen
    started: float
    ready: float = 0.0

    @classmethod
    def spawn(cls, bins: ts.Binaries, node: Node, port: int, target: str) -> "Foreground":
        argv = [str(bins.tailscale), f"--socket={node.socket}", "serve", f"--http={port}", target]
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, env=ts.cli_env(), start_new_session=True)
        return cls(p, t0)

    def alive(self) -> bool:
        """Running (not exited); never reaps, so stop() still gets its rusage."""
        return self.proc.returncode is None and os.waitid(
            os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None

    def wait_ready(self, timeout: float = 20) -> "Foreground":
        """Until the child prints "Press Ctrl+C to exit." (after tailscaled
        accepted its config); raises with its output if it exits first."""
        assert self.proc.stdout is not None
        out, deadline = b"", time.monotonic() + timeout
        while b"Ctrl+C" not in out:
            chunk = _read(self.proc.stdout.fileno(), deadline)
            if not chunk:
                raise RuntimeError(f"foreground serve exited: {error_line(out.decode(errors='replace'))}")
            out += chunk
        self.ready = time.perf_counter()
        return self

    def stop(self, sig: int = signal.SIGTERM) -> float:
        """Stop and reap; returns the child's user+system CPU s (wait4), or
        0 if it was reaped elsewhere."""
        if self.proc.returncode is None:
            os.kill(self.proc.pid, sig)  # not reaped by anyone but us: the pid is still this child's
            _, status, ru = os.wait4(self.proc.pid, 0)
            self.proc.returncode = os.waitstatus_to_exitcode(status)
            if self.proc.stdout:
                self.proc.stdout.close()
            return ru.ru_utime + ru.ru_stime
        return 0.0


def apply_b(bins: ts.Binaries, node: Node, target: str) -> float:
    """reset + one --bg; returns the children's CPU s. Raises on a failure."""
    cpu = 0.0
    for argv in (ts.serve_reset_command(bins, node.socket),
                 [str(bins.tailscale), f"--socket={node.socket}", "serve", "--bg", "--yes",
                  f"--http={PORT}", target]):
        code, out, c = run_cli(argv)
        cpu += c
        if code:
            raise RuntimeError(f"{' '.join(argv[2:])}: {error_line(out)}")
    return cpu


# -- a fleet of nodes --------------------------------------------------------------------


@dataclass
class Fleet:
    bins: ts.Binaries
    control: ControlThread
    root: Path
    size: int
    tag: str
    nodes: list[Node] = field(default_factory=list)

    def login(self) -> None:
        """Fresh statedirs, all logged in once (later starts reuse the state)."""
        key = self.control.create_key(reusable=True)["secret"]
        self.nodes = [Node(bins=self.bins, statedir=self.root / f"n{i}", control_url=self.control.url)
                      for i in range(self.size)]
        for n in self.nodes:
            n.start()
        with ThreadPoolExecutor(self.size) as ex:
            list(ex.map(lambda x: x[1].up(key, f"{self.tag}-n{x[0]}", timeout=60), enumerate(self.nodes)))
        self.wait_running()

    def start(self) -> None:
        for n in self.nodes:
            n.start()
        self.wait_running()

    def wait_running(self) -> None:
        for n in self.nodes:
            wait_for(lambda: (s := n.status()).backend_state == ts.BackendState.RUNNING and s.tailscale_ips
                     and s.dns_name, 60, f"{n.statedir.name} Running with a netmap")
            if services(n):  # a --bg config from a previous round survives the restart: clear it
                post_config(n, {})

    def stop(self) -> None:
        for n in self.nodes:
            n.kill()

    def forget(self) -> None:
        for n in self.control.nodes():
            if n["hostname"].startswith(f"{self.tag}-"):
                self.control.admin("delete_node", id=n["id"])


def measure_option(fleet: Fleet, option: str, settle: float) -> dict[str, Any]:
    """Apply `option` on every node, check it through the LocalAPI, wait
    `settle` s, then read every process's smaps_rollup. Leaves the option in place."""
    bins, kids = fleet.bins, []
    for i, n in enumerate(fleet.nodes):
        if option == "A":
            kids.append(Foreground.spawn(bins, n, PORT, target_for(i)).wait_ready())
        elif option == "B":
            apply_b(bins, n, target_for(i))
        else:
            post_config(n, web_config(n, [(PORT, target_for(i))]))
    for i, n in enumerate(fleet.nodes):
        wait_for(lambda: services(n) == desired(target_for(i)), 10, f"{n.statedir.name} serving")
    pids = ([n.proc.pid for n in fleet.nodes if n.proc], [k.proc.pid for k in kids])
    c0, w0 = [[cpu_s(p) for p in ps] for ps in pids], time.monotonic()
    time.sleep(settle)
    c1, w1 = [[cpu_s(p) for p in ps] for ps in pids], time.monotonic()
    for i, n in enumerate(fleet.nodes):  # still serving when measured
        assert services(n) == desired(target_for(i)), f"{n.statedir.name} lost its serve config"
    tsd = [smaps(n.proc.pid) for n in fleet.nodes if n.proc]
    child = [smaps(k.proc.pid) for k in kids]

    def per_proxy(rows: list[dict[str, int]], key: str) -> float:
        return sum(r[key] for r in rows) / fleet.size / 1024  # MiB

    out = {f"tailscaled_{k}": per_proxy(tsd, k) for k in ("pss", "uss", "rss")}
    out.update({f"child_{k}": per_proxy(child, k) for k in ("pss", "uss", "rss")})
    # CPU while idle and serving, per proxy: ms per second = thousandths of a core
    out["tailscaled_cpu_ms_per_s"], out["child_cpu_ms_per_s"] = (
        (sum(c1[j]) - sum(c0[j])) / (w1 - w0) / fleet.size * 1000 for j in (0, 1))
    out["children"] = len(kids)
    out["_kids"] = kids
    return out


def teardown_option(fleet: Fleet, option: str, kids: list[Foreground]) -> None:
    for k in kids:
        k.stop()
    for n in fleet.nodes:
        if option != "A":
            post_config(n, {})
        wait_for(lambda: not services(n), 10, f"{n.statedir.name} serve config cleared")


def latency(bins: ts.Binaries, node: Node, option: str, runs: int) -> dict[str, Any]:
    """`runs` full applies on one node that serves nothing: per apply, the
    wall time, the CLI children's CPU (wait4; for A the child's whole life:
    start, ready, stop) and tailscaled's CPU during the timed part (medians). Each result is checked through the LocalAPI (not timed)."""
    t = target_for(0)
    pid = node.proc.pid  # type: ignore[union-attr]
    walls, child_cpu, tsd_cpu = [], [], []
    for _ in range(runs):
        d0 = cpu_s(pid)
        if option == "A":
            fg = Foreground.spawn(bins, node, PORT, t).wait_ready()
            tsd_cpu.append(cpu_s(pid) - d0)
            walls.append(fg.ready - fg.started)
            wait_for(lambda: services(node) == desired(t), 10, "A serving")
            cpu = fg.stop()
            wait_for(lambda: not services(node), 10, "A config gone with its child")
        elif option == "B":
            t0 = time.perf_counter()
            cpu = apply_b(bins, node, t)
            walls.append(time.perf_counter() - t0)
            tsd_cpu.append(cpu_s(pid) - d0)
            assert services(node) == desired(t)
            post_config(node, {})
        else:
            cfg = web_config(node, [(PORT, t)])

            async def one() -> float:
                t0 = time.perf_counter()
                await node.api.request("POST", "/localapi/v0/serve-config", cfg)
                return time.perf_counter() - t0
            d0 = cpu_s(pid)
            walls.append(api_call(one()))
            tsd_cpu.append(cpu_s(pid) - d0)
            cpu = 0.0
            assert services(node) == desired(t)
            post_config(node, {})
        child_cpu.append(cpu)
    med = lambda xs: statistics.median(xs) * 1000  # noqa: E731
    return {"median_ms": med(walls), "min_ms": min(walls) * 1000, "max_ms": max(walls) * 1000,
            "child_cpu_ms": med(child_cpu),
            "tailscaled_cpu_ms": med(tsd_cpu), "runs": runs}


def memory_and_latency(bins: ts.Binaries, control: ControlThread, root: Path, version: str,
                       sizes: list[int], settle: float, runs: int) -> tuple[list[dict], dict[str, dict]]:
    mem, lat = [], {}
    for size in sizes:
        tag = f"v{version.replace('.', '')}s{size}"
        fleet = Fleet(bins, control, root / tag, size, tag)
        try:
            fleet.login()
            for option in OPTIONS:
                fleet.stop()
                fleet.start()  # every option measured on freshly started tailscaleds
                m = measure_option(fleet, option, settle)
                teardown_option(fleet, option, m.pop("_kids"))
                if size == min(sizes):  # on a node with no serve config, as at a launch
                    lat[option] = latency(bins, fleet.nodes[0], option, runs)
                m.update(version=version, size=size, option=option)
                mem.append(m)
                print(f"  {version} N={size} {LABEL[option]}: tailscaled PSS {m['tailscaled_pss']:.1f} MiB, "
                      f"child PSS {m['child_pss']:.1f} MiB per proxy", flush=True)
        finally:
            fleet.stop()
            fleet.forget()
    return mem, lat


# -- behaviour ---------------------------------------------------------------------------

STAND_IN = r"""
import asyncio, json, subprocess, sys, time
from pathlib import Path
from supervisor import procs, tailscale as ts
a = json.loads(sys.argv[1])
bins = ts.Binaries(Path(a["tailscale"]), Path(a["tailscaled"]))
sd = Path(a["statedir"])
pipe = procs.ParentDeathPipe() if a["death_pipe"] else None
argv, env = ts.tailscaled_command(bins, sd, quiet_control_url=a["control"],
                                  parent_death_fd=pipe.read_fd if pipe else None)
d = subprocess.Popen(argv, env=env, pass_fds=(pipe.read_fd,) if pipe else (), stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
api = ts.LocalAPI(sd / ts.SOCKET_FILE)
deadline = time.monotonic() + 30
while True:
    try:
        s = asyncio.run(api.status())
        if s.backend_state == ts.BackendState.RUNNING and s.tailscale_ips and s.dns_name:
            break
    except Exception:
        pass
    if time.monotonic() > deadline:
        sys.exit("stand-in: tailscaled not Running")
    time.sleep(0.05)
sock = f"--socket={sd / ts.SOCKET_FILE}"
serve = None
if a["option"] == "A":
    serve = subprocess.Popen([str(bins.tailscale), sock, "serve", "--http=80", a["target"]],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
else:
    subprocess.run([str(bins.tailscale), sock, "serve", "reset"], env=ts.cli_env(), check=True,
                   capture_output=True)
    subprocess.run([str(bins.tailscale), sock, "serve", "--bg", "--yes", "--http=80", a["target"]],
                   env=ts.cli_env(), check=True, capture_output=True)
while not ts.serve_ports(asyncio.run(api.get_json("/localapi/v0/serve-config"))):
    time.sleep(0.05)
print(json.dumps({"tailscaled": d.pid, "serve": serve.pid if serve else None}), flush=True)
time.sleep(3600)
"""


def gone_within(pid: int | None, timeout: float) -> float | None:
    """Seconds until `pid` exits (reaping it if it is ours), or None if it outlives `timeout`."""
    if pid is None:
        return None
    t0 = time.monotonic()
    try:
        psutil.Process(pid).wait(timeout)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        return None
    return time.monotonic() - t0


def parent_crash(bins: ts.Binaries, control: ControlThread, root: Path, option: str, tag: str,
                 death_pipe: bool = True) -> dict[str, Any]:
    """A stand-in supervisor (tailscaled, with TS_PARENT_DEATH_FD as the
    supervisor runs it unless `death_pipe` is False, plus option A's child or
    option B's applied config) is killed with SIGKILL. Then: did tailscaled
    and the serve child exit, and how soon (the child's time counts from
    tailscaled's exit); and, with tailscaled started again on the same
    statedir, what serve config it has before anyone applies anything (read
    as soon as the LocalAPI answers, and once Running). Without the pipe:
    whether the orphans still serve."""
    statedir = root / f"crash-{option}{'' if death_pipe else '-nopipe'}"
    node = Node(bins=bins, statedir=statedir, control_url=control.url)
    try:  # a logged-in statedir for the stand-in
        node.start()
        node.up(control.create_key()["secret"], f"{tag}-crash{option.lower()}{'' if death_pipe else 'np'}",
                timeout=30)
        node.wait_state(ts.BackendState.RUNNING, 30)
    finally:
        node.kill()
    arg = json.dumps({"tailscale": str(bins.tailscale), "tailscaled": str(bins.tailscaled),
                      "statedir": str(statedir), "control": control.url, "option": option,
                      "target": target_for(0), "death_pipe": death_pipe})
    parent = subprocess.Popen([sys.executable, "-c", STAND_IN, arg], cwd=ROOT, stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    out: dict[str, Any] = {"option": option, "death_pipe": death_pipe}
    pids: dict[str, int | None] = {}
    again = Node(bins=bins, statedir=statedir, control_url=control.url)
    try:
        assert parent.stdout is not None
        pids = json.loads(parent.stdout.readline())
        parent.kill()
        parent.wait()
        wait = 10 if death_pipe else 3
        out["tailscaled_exit_s"] = gone_within(pids["tailscaled"], wait)
        out["serve_child_exit_s"] = gone_within(pids["serve"], wait) if pids["serve"] else None
        out["serve_child_orphaned"] = bool(pids["serve"]) and out["serve_child_exit_s"] is None
        if out["tailscaled_exit_s"] is None:  # orphaned tailscaled: does it still serve, unsupervised?
            orphan = ts.LocalAPI(statedir / ts.SOCKET_FILE)
            out["orphans_serve"] = sorted(s.describe() for s in ts.serve_services(
                api_call(orphan.get_json("/localapi/v0/serve-config"))))
            return out
        again.start()  # returns once the LocalAPI answers
        out["config_at_first_answer"] = sorted(s.describe() for s in services(again))
        seen: dict[str, float] = {}

        def settled() -> bool:
            now = time.monotonic() - again.started_at
            if services(again):
                seen.setdefault("config_s", now)
            if again.status().backend_state == ts.BackendState.RUNNING:
                seen.setdefault("running_s", now)
            return len(seen) == 2 or ("running_s" in seen and now > seen["running_s"] + 2)
        wait_for(settled, 30, "Running after the restart")
        out["config_when_running"] = sorted(s.describe() for s in services(again))
        out["restart_to_config_s"], out["restart_to_running_s"] = seen.get("config_s"), seen["running_s"]
    finally:
        again.kill()
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid in pids.values():  # whatever outlived the crash
            if pid and psutil.pid_exists(pid):
                try:
                    p = psutil.Process(pid)
                    p.kill()
                    p.wait(5)
                except psutil.Error:
                    pass
    return out


def behaviour(bins: ts.Binaries, control: ControlThread, root: Path, version: str) -> dict[str, Any]:
    tag = f"v{version.replace('.', '')}b"
    res: dict[str, Any] = {"version": version}
    node = Node(bins=bins, statedir=root / f"{tag}-node", control_url=control.url).start()
    try:
        node.up(control.create_key()["secret"], f"{tag}-node", timeout=30)
        wait_for(lambda: (s := node.status()).backend_state == ts.BackendState.RUNNING and s.dns_name,
                 30, "Running")
        three = [(80, "http://127.0.0.1:9"), (81, "ftp://127.0.0.1:10"), (82, "http://127.0.0.1:11")]

        # (a) partial failure: the 2nd of three services is refused.
        post_config(node, {})
        codes = []
        for port, t in three:  # B, as the runner does it: reset, then --bg until the first failure
            code, out, _ = run_cli([str(bins.tailscale), f"--socket={node.socket}", "serve", "--bg", "--yes",
                                    f"--http={port}", t])
            codes.append(code)
            if code:
                res["B_refusal"] = error_line(out)
                break
        res["B_partial"] = {"exit_codes": codes, "served": sorted(s.describe() for s in services(node))}
        post_config(node, {})
        kids, alive = [], []
        for port, t in three:  # A: one child per service
            fg = Foreground.spawn(bins, node, port, t)
            try:
                fg.wait_ready(10)
                alive.append(True)
            except RuntimeError as e:
                res["A_refusal"] = str(e)
                alive.append(False)
            kids.append(fg)
        res["A_partial"] = {"children_alive": alive, "served": sorted(s.describe() for s in services(node))}
        for k in kids:
            k.stop()
        post_config(node, {})
        try:  # C: one POST with all three
            post_config(node, web_config(node, three))
            res["C_partial"] = {"accepted": True}
        except ts.LocalAPIError as e:
            res["C_partial"] = {"accepted": False, "error": str(e)}
        res["C_partial"]["served"] = sorted(s.describe() for s in services(node))
        post_config(node, {})

        # A's child and the config under it: someone runs `serve reset` (or B's apply).
        fg = Foreground.spawn(bins, node, PORT, target_for(0)).wait_ready()
        run_cli(ts.serve_reset_command(bins, node.socket))
        time.sleep(2)
        res["A_after_reset"] = {"child_alive": fg.alive(),
                                "served": sorted(s.describe() for s in services(node))}
        if not res["A_after_reset"]["child_alive"]:
            fg.proc.wait()
            res["A_after_reset"]["child_status"] = fg.proc.returncode
        fg.stop()

        # A's child when tailscaled restarts under it (the supervisor lives on).
        fg = Foreground.spawn(bins, node, PORT, target_for(0)).wait_ready()
        node.kill(signal.SIGKILL)
        t0 = time.monotonic()
        try:
            code = fg.proc.wait(10)
            res["A_child_after_tailscaled_kill"] = {"exit_s": time.monotonic() - t0, "status": code}
        except subprocess.TimeoutExpired:
            res["A_child_after_tailscaled_kill"] = {"exit_s": None, "still_alive_after": "10 s"}
        fg.stop()
        node.start()
        node.wait_state(ts.BackendState.RUNNING, 30)
        res["A_config_after_tailscaled_restart"] = sorted(s.describe() for s in services(node))
    finally:
        node.kill()
    # (b) the supervisor is killed -9
    res["crash"] = [parent_crash(bins, control, root, o, tag) for o in ("A", "B")]
    res["crash"].append(parent_crash(bins, control, root, "A", tag, death_pipe=False))
    for n in control.nodes():
        if n["hostname"].startswith(f"{tag}-"):
            control.admin("delete_node", id=n["id"])
    return res


# -- report ------------------------------------------------------------------------------


def table(mem: list[dict], lat: dict[str, dict[str, dict]], beh: list[dict], settle: float, runs: int) -> str:
    lines = [f"Memory per proxy, MiB, {settle:g} s after all Running and serving "
             "(tailscaled + serve child; smaps_rollup); CPU over those s, ms per s per proxy",
             f"{'release':<8}{'N':>3}  {'option':<20}{'tsd PSS':>8}{'tsd USS':>8}{'tsd RSS':>8}"
             f"{'kid PSS':>8}{'kid USS':>8}{'kid RSS':>8}{'PSS sum':>8}{'USS sum':>8}"
             f"{'tsd CPU':>9}{'kid CPU':>9}"]
    for m in mem:
        lines.append(f"{m['version']:<8}{m['size']:>3}  {LABEL[m['option']]:<20}"
                     + "".join(f"{m[k]:>8.1f}" for k in ("tailscaled_pss", "tailscaled_uss", "tailscaled_rss",
                                                        "child_pss", "child_uss", "child_rss"))
                     + f"{m['tailscaled_pss'] + m['child_pss']:>8.1f}{m['tailscaled_uss'] + m['child_uss']:>8.1f}"
                     + f"{m['tailscaled_cpu_ms_per_s']:>9.2f}{m['child_cpu_ms_per_s']:>9.2f}")
    lines += ["", f"One apply on one node (median of {runs}; A = spawn -> 'Press Ctrl+C', B = reset + --bg "
                  "exit, C = POST answered)",
              f"{'release':<8}  {'option':<20}{'median':>9}{'min':>9}{'max':>9}{'CLI CPU':>10}{'tsd CPU':>10}"]
    for version, per in lat.items():
        for o, d in per.items():
            lines.append(f"{version:<8}  {LABEL[o]:<20}{d['median_ms']:>6.1f} ms{d['min_ms']:>6.1f} ms"
                         f"{d['max_ms']:>6.1f} ms{d['child_cpu_ms']:>7.1f} ms{d['tailscaled_cpu_ms']:>7.1f} ms")

    def shown(d: dict[str, Any]) -> str:
        """Seconds (keys ending in _s) as ms; None as "-" (did not happen)."""
        return ", ".join(f"{k}={'-' if v is None else f'{v * 1000:.1f} ms' if k.endswith('_s') else v}"
                         for k, v in d.items())
    lines += ["", "Behaviour"]
    for b in beh:
        lines.append(f"  {b['version']}:")
        for k, v in b.items():
            if k not in ("version", "crash"):
                lines.append(f"    {k}: {shown(v) if isinstance(v, dict) else v}")
        for c in b["crash"]:
            lines.append(f"    kill -9 of the parent: {shown(c)}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(prog="scripts/bench-serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,10", help="fleet sizes (the smallest also gets the latency runs)")
    ap.add_argument("--versions", default="1.96.4,1.78.1", help="tailscale releases under .tools/")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds between serving and measuring")
    ap.add_argument("--runs", type=int, default=10, help="applies timed per option")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out")
    args = ap.parse_args()
    benchlib.enter("bench-serve")
    procs.become_subreaper()  # what a killed stand-in leaves behind comes to us, to be reaped
    sizes = sorted(int(x) for x in args.sizes.split(",") if x.strip())
    versions = [v.strip() for v in args.versions.split(",") if v.strip()]
    root = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    control = ControlThread(root / "control")
    started = time.monotonic()
    mem: list[dict] = []
    lat: dict[str, dict] = {}
    beh: list[dict] = []
    try:
        for version in versions:
            bins = private_copy(ts.Binaries.locate(version=version), root / f"bin-{version}")
            print(f"{bins.version()}: memory and apply latency, sizes {sizes} ...", flush=True)
            m, lat[version] = memory_and_latency(bins, control, root, version, sizes, args.settle, args.runs)
            mem += m
            print(f"{version}: behaviour ...", flush=True)
            beh.append(behaviour(bins, control, root, version))
    finally:
        control.close()
    summary = {"memory_mib_per_proxy": mem, "apply": lat, "behaviour": beh, "settle_s": args.settle,
               "cores": len(os.sched_getaffinity(0)), "elapsed_s": time.monotonic() - started}
    args.out.mkdir(exist_ok=True)
    (args.out / "bench-serve.json").write_text(json.dumps(summary, indent=2))
    print()
    print(table(mem, lat, beh, args.settle, args.runs))
    print(f"\nwrote {args.out / 'bench-serve.json'} ({summary['elapsed_s']:.0f} s)")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
