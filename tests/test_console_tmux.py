"""The interactive console as an operator meets it: `ts-supervisor run` in a
real terminal (a tmux pane, 100x30), two real proxies on the test control,
driven by keystrokes and read back from the screen; effects checked through
`status --json` and the process tree."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import tomli_w

from tests.harness import wait_for
from tests.supervisor_harness import ROOT, SupervisorProc
from tests.test_supervisor import key_file, proxy_on

pytestmark = pytest.mark.real

# any SGR that sets a foreground or background colour (39/49, "default colour", are resets)
COLOUR_SGR = re.compile(r"\x1b\[(?:[0-9;]*;)?(?:3[0-8]|9[0-7]|4[0-8]|10[0-7])(?:;[0-9;]*)?m")
REVERSE_SGR = re.compile(r"\x1b\[(?:[0-9;]*;)?7(?:;[0-9;]*)?m")


class Pane:
    """One tmux server on its own socket (-L), one session, one pane."""

    def __init__(self, tmp_path: Path) -> None:
        self.socket = f"ts-sup-console-{uuid.uuid4().hex[:10]}"
        self.conf = tmp_path / "tmux.conf"
        # keep the pane after the program exits, so its last screen can be read
        self.conf.write_text("set -g remain-on-exit on\nset -g history-limit 5000\n")

    def tmux(self, *args: str, check: bool = True) -> str:
        out = subprocess.run(["tmux", "-L", self.socket, "-f", str(self.conf), *args],
                             capture_output=True, text=True, timeout=10)
        if check and out.returncode != 0:
            raise AssertionError(f"tmux {args}: {out.stderr}")
        return out.stdout

    def start(self, command: str, width: int = 100, height: int = 30) -> None:
        self.tmux("new-session", "-d", "-s", "main", "-x", str(width), "-y", str(height), command)
        # the pane's shell is tmux's child and the program its child: hold them as psutil
        # Processes from now on, which check the create time before they signal, so a
        # teardown can never signal a reused pid
        shell = psutil.Process(int(self.tmux("display-message", "-p", "-t", "main", "#{pane_pid}")))
        self.program = wait_for(lambda: next(iter(shell.children()), None), 10, "the pane's program")

    def keys(self, *keys: str) -> None:
        for k in keys:  # one at a time, as a person types
            self.tmux("send-keys", "-t", "main", k)
            time.sleep(0.05)

    def screen(self, escapes: bool = False) -> str:
        return self.tmux("capture-pane", "-p", "-t", "main", *(["-e"] if escapes else []))

    def wait_screen(self, pred, timeout: float, what: str) -> str:
        try:
            return wait_for(lambda: (s := self.screen()) and pred(s) and s, timeout, what, interval=0.1)
        except AssertionError as e:
            raise AssertionError(f"{e}\nscreen:\n{self.screen()}") from None

    def kill(self) -> None:
        self.tmux("kill-server", check=False)
        tmpdir = Path(os.environ.get("TMUX_TMPDIR") or "/tmp") / f"tmux-{os.getuid()}"
        (tmpdir / self.socket).unlink(missing_ok=True)


def row(screen: str, name: str) -> str:
    return next((line for line in screen.splitlines() if line.split()[:1] == [name]), "")


def raw_row(screen: str, name: str) -> str:
    """The first line naming `name`, escapes and all."""
    return next((line for line in screen.splitlines() if name in re.sub(r"\x1b\[[0-9;]*m", "", line)), "")


def status(data_dir: Path) -> dict[str, dict]:
    out = subprocess.run([sys.executable, "-m", "supervisor", "status", "--json", "--data-dir", str(data_dir)],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out
    return {p["name"]: p for p in json.loads(out.stdout)["proxies"]}


@pytest.fixture
def pane(tmp_path: Path):
    p = Pane(tmp_path)
    p.program = None
    yield p
    if p.program is not None:  # a failed test: stop the supervisor before its terminal goes
        try:
            p.program.send_signal(signal.SIGTERM)  # psutil: only if it is still that process
            p.program.wait(30)
        except psutil.Error:
            pass
    p.kill()


def start_run(pane: Pane, tmp_path: Path, control, names, settings: dict, **size) -> SupervisorProc:
    """`ts-supervisor run` in the pane, its proxies `names` on the test control."""
    sup = SupervisorProc(tmp_path / "conf.d", tmp_path / "data")
    for name in names:
        keyfile, _ = key_file(tmp_path, control, name, reusable=True)
        proxy_on(sup, control, name, keyfile)
    path = tmp_path / "settings.toml"
    path.write_text(tomli_w.dumps(settings))
    script = tmp_path / "run.sh"
    run = shlex.join([sys.executable, "-m", "supervisor", "run", "--config-dir", str(sup.config_dir),
                      "--data-dir", str(sup.data_dir), "--settings", str(path)])
    # the pane's own size, not the COLUMNS/LINES tmux inherited from pytest; faulthandler
    # so that a hang can be diagnosed (SIGABRT prints every thread's stack in the pane)
    env = "env -u TS_SUPERVISOR_DATA_DIR -u COLUMNS -u LINES PYTHONFAULTHANDLER=1 NO_COLOR=1 TERM=xterm-256color"
    script.write_text(f"cd {shlex.quote(str(ROOT))}\n"
                      f"{env} {run}\n"
                      f"echo \"exit=$?\" > {shlex.quote(str(tmp_path / 'exit'))}\n"
                      f"stty -a > {shlex.quote(str(tmp_path / 'stty'))}\n")
    pane.start(f"sh {shlex.quote(str(script))}", **size)
    return sup


def test_operator_drives_the_console_with_keys(pane: Pane, control, tmp_path: Path):
    sup = start_run(pane, tmp_path, control, ("alpha", "bravo"),
                    {"backoff_initial": 0.2, "memory_period": 1})  # cpu pss on screen soon

    # both proxies come up on screen
    pane.wait_screen(lambda s: "running" in row(s, "alpha") and "running" in row(s, "bravo"), 60,
                     "both proxies running on screen")
    screen = pane.screen()
    assert "q quit" in screen and "R recover" in screen
    assert re.search(r"\b1[78]\dd\b", row(screen, "alpha")), screen  # the node key's countdown (180 days)
    assert int((sup.data_dir / "supervisor.lock").read_text()) == pane.program.pid
    st = status(sup.data_dir)
    before = st["bravo"]["pid"]
    assert before and st["alpha"]["pid"]

    # Down selects the second proxy (reverse video), r restarts it and says so
    pane.keys("Down")
    wait_for(lambda: REVERSE_SGR.search(raw_row(pane.screen(escapes=True), "bravo")), 5,
             "bravo's row in reverse video")
    assert not REVERSE_SGR.search(raw_row(pane.screen(escapes=True), "alpha"))
    pane.keys("r")
    pane.wait_screen(lambda s: "restart requested for bravo" in s, 5, "the footer to report the restart")
    wait_for(lambda: (b := status(sup.data_dir)["bravo"])["state"] == "running"
             and b["pid"] not in (None, before), 60, "bravo relaunched with a new tailscaled")
    assert status(sup.data_dir)["alpha"]["pid"] == st["alpha"]["pid"]  # the other one untouched
    screen = pane.wait_screen(lambda s: "running" in row(s, "bravo") and "%" in s, 10, "bravo's new row")
    print("\n--- screen (100x30) ---\n" + screen.rstrip() + "\n--- end ---")

    # l shows bravo's recent log lines under the table; Esc closes the panel
    pane.keys("l")
    screen = pane.wait_screen(lambda s: "log: bravo" in s and s.count("│") >= 6, 5, "the log panel")
    print("\n--- log panel ---\n" + screen.rstrip() + "\n--- end ---")
    logged = (sup.data_dir / "proxies" / "bravo" / "tailscaled.log").read_text().splitlines()
    shown = [line.strip("│ ").rstrip("…") for line in screen.splitlines() if line.startswith("│")]
    assert shown and all(any(s[:40] in line for line in logged) for s in shown if s), (shown, logged[-10:])
    pane.keys("Escape")
    pane.wait_screen(lambda s: "log: bravo" not in s, 5, "the log panel to close")

    # e shows bravo's event history
    pane.keys("e")
    screen = pane.wait_screen(lambda s: "events: bravo" in s, 5, "the event panel")
    panel = "\n".join(line for line in screen.splitlines() if line.startswith("│"))
    assert "running" in panel and "alpha" not in panel, screen
    pane.keys("Escape")
    pane.wait_screen(lambda s: "events: bravo" not in s, 5, "the event panel to close")

    # R asks first; n cancels and nothing happens
    pane.keys("R")
    pane.wait_screen(lambda s: "recovery of bravo" in s and "y/N" in s, 5, "the confirmation prompt")
    pane.keys("n")
    pane.wait_screen(lambda s: "recovery of bravo cancelled" in s, 5, "the cancellation")
    time.sleep(1.0)  # observation window: a cancelled recovery must not happen late
    assert status(sup.data_dir)["bravo"]["recoveries"] == 0

    # R then y: one stale-state recovery
    pane.keys("R")
    pane.wait_screen(lambda s: "y/N" in s, 5, "the confirmation prompt")
    pane.keys("y")
    pane.wait_screen(lambda s: "stale-state recovery requested for bravo" in s, 5, "the footer")
    wait_for(lambda: status(sup.data_dir)["bravo"]["recoveries"] == 1, 30, "bravo's recovery")
    pane.wait_screen(lambda s: "running" in row(s, "bravo") and "running" in row(s, "alpha"), 60,
                     "bravo running again after the recovery")
    assert status(sup.data_dir)["alpha"]["recoveries"] == 0

    # NO_COLOR: attributes (bold, reverse) but not one colour
    coloured = pane.screen(escapes=True)
    assert REVERSE_SGR.search(coloured), repr(coloured)
    assert not COLOUR_SGR.search(coloured), repr(coloured)

    # q stops every child and exits cleanly, with the terminal restored
    supervisor = pane.program
    children = supervisor.children(recursive=True)
    assert any(c.name() == "tailscaled" for c in children)
    pane.keys("q")
    try:
        supervisor.wait(60)
    except psutil.TimeoutExpired:
        supervisor.send_signal(signal.SIGABRT)
        time.sleep(1)
        history = pane.tmux("capture-pane", "-p", "-t", "main", "-S", "-300")
        raise AssertionError(f"q did not stop the supervisor:\n{history}\n"
                             + "\n".join(json.dumps(e) for e in sup.events()[-15:])) from None
    for c in children:
        assert not c.is_running() or c.status() == psutil.STATUS_ZOMBIE, c
    wait_for(lambda: (tmp_path / "stty").exists() and (tmp_path / "stty").read_text(), 10, "the stty check")
    assert (tmp_path / "exit").read_text().strip() == "exit=0"
    stty = (tmp_path / "stty").read_text().split()
    assert "icanon" in stty and "echo" in stty, stty  # cbreak undone
    assert not [p for p in psutil.process_iter(["name", "cmdline"])
                if p.info["name"] == "tailscaled" and str(sup.data_dir) in " ".join(p.info["cmdline"] or [])]


def test_many_proxies_fit_the_pane_and_scroll_with_keys(pane: Pane, control, tmp_path: Path):
    """8 proxies in a 100x14 pane: only the rows that fit, a 'rows' line, End and
    Home scroll to the ends; a taller pane shows more rows."""
    names = [f"p{i}" for i in range(8)]
    sup = start_run(pane, tmp_path, control, names, {"backoff_initial": 0.2}, width=100, height=14)
    wait_for(lambda: all(p["state"] == "running" for p in status(sup.data_dir).values())
             and len(status(sup.data_dir)) == 8, 90, "8 proxies running")
    screen = pane.wait_screen(lambda s: "running" in row(s, "p0") and "of 8" in s, 20, "the first rows")
    lines = screen.rstrip("\n").split("\n")
    shown = [n for n in names if row(screen, n)]
    assert len(lines) <= 14 and "q quit" in screen, screen
    assert shown == names[:len(shown)] and 2 <= len(shown) < 8, screen
    assert f"rows 1–{len(shown)} of 8" in screen, screen
    pane.keys("End")
    screen = pane.wait_screen(lambda s: row(s, "p7") and "–8 of 8" in s, 5, "the last rows")
    assert not row(screen, "p0") and REVERSE_SGR.search(raw_row(pane.screen(escapes=True), "p7"))
    pane.keys("Home")
    pane.wait_screen(lambda s: row(s, "p0") and not row(s, "p7"), 5, "the first rows again")
    pane.tmux("resize-window", "-t", "main", "-x", "100", "-y", "30")
    screen = pane.wait_screen(lambda s: all(row(s, n) for n in names), 10, "every row in a taller pane")
    assert "of 8" not in screen  # everything fits: no rows line
    pane.keys("q")
    wait_for(lambda: (tmp_path / "exit").exists() and (tmp_path / "exit").read_text(), 60, "a clean exit")
    assert (tmp_path / "exit").read_text().strip() == "exit=0"
