"""Hostile proxy files written into a running supervisor's conf.d: each costs
one config_error line, and the running fleet keeps its nodes (same tailscaled
pids, still running). Real tailscaled on the embedded control."""
from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from supervisor import ipc
from tests.harness import wait_for
from tests.supervisor_harness import ROOT

pytestmark = pytest.mark.real

NEST_BOMB = "x = " + "[" * 500 + "]" * 500 + "\n"  # RecursionError in tomllib before the fix
BAD_TARGET = 'target = "http://[::1:8080"\nlogin_server = "embedded"\n'  # ValueError in urlsplit


def atomic_write(path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def config_errors(sup) -> list[str]:
    return ipc.call(sup.data_dir, "status")["config_errors"]


def test_bad_files_mid_run_cost_one_line_each_and_the_fleet_keeps_running(sup):
    for name in ("web", "api"):
        sup.write_proxy(name, hostname=name, target="http://127.0.0.1:9", serve="http", port=80,
                        login_server="embedded")
    sup.start()
    sup.wait_state("web", "running")
    sup.wait_state("api", "running")
    before = sup.status()
    good = {n: (sup.config_dir / f"{n}.toml").read_text() for n in ("web", "api")}
    n = len(sup.events())

    # New bad files, and both running proxies' own files broken the same two ways.
    atomic_write(sup.config_dir / "bomb.toml", NEST_BOMB)
    atomic_write(sup.config_dir / "typo.toml", BAD_TARGET)
    atomic_write(sup.config_dir / "api.toml", NEST_BOMB)
    atomic_write(sup.config_dir / "web.toml", good["web"].replace("127.0.0.1:9", "[::1:9"))
    for name in ("bomb", "typo", "api", "web"):  # wait_event fails at once if the supervisor died
        sup.wait_event(lambda e, name=name: e["event"] == "config_error" and e["proxy"] == name, 20,
                       f"config_error for {name}.toml", after=n)
    assert sup.proc is not None and sup.proc.poll() is None, sup.text()[-3000:]

    errors = config_errors(sup)
    assert len(errors) == 4 and all("\n" not in e for e in errors), errors
    for name, words in (("bomb", "nested too deeply"), ("api", "nested too deeply"),
                        ("typo", "target: "), ("web", "target: ")):
        line = next(e for e in errors if e.startswith(str(sup.config_dir / f"{name}.toml")))
        assert words in line, line
    after = sup.status()
    assert set(after) == {"web", "api"}
    for name in ("web", "api"):
        assert after[name]["state"] == "running" and after[name]["pid"] == before[name]["pid"]
        assert psutil.pid_exists(after[name]["pid"])
    assert [e for e in sup.events()[n:] if e["proxy"] in ("web", "api")
            and e["event"] != "config_error"] == []

    # The human status lists them too.
    shown = subprocess.run([sys.executable, "-m", "supervisor", "status", "--data-dir", str(sup.data_dir)],
                           cwd=ROOT, capture_output=True, text=True, timeout=30,
                           env={**os.environ, "COLUMNS": "1000"})
    assert shown.returncode == 0 and "Traceback" not in shown.stderr
    for name in ("bomb", "typo", "api", "web"):
        assert f"config error: {sup.config_dir / name}.toml: " in shown.stdout, shown.stdout

    # Fixed files (same content as before) change nothing: same nodes, no restart.
    for name in ("web", "api"):
        atomic_write(sup.config_dir / f"{name}.toml", good[name])
    (sup.config_dir / "bomb.toml").unlink()
    (sup.config_dir / "typo.toml").unlink()
    wait_for(lambda: config_errors(sup) == [], 20, "the fixed files to be reloaded")
    final = sup.status()
    for name in ("web", "api"):
        assert final[name]["state"] == "running" and final[name]["pid"] == before[name]["pid"]
        assert final[name]["restarts"] == 0
