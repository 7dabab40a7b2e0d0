"""Run the real `ts-supervisor run` as a child process and observe it the way
a user or a script would: events.jsonl, `status --json`, the process tree."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import tomli_w

from supervisor import ipc
from tests.harness import Timeout, die_with_test, wait_for

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class SupervisorProc:
    config_dir: Path
    data_dir: Path
    settings: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    output: Path | None = None

    def write_proxy(self, name: str, **keys: Any) -> Path:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        path = self.config_dir / f"{name}.toml"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(tomli_w.dumps(keys))
        tmp.replace(path)
        return path

    def start(self, wait: bool = True) -> "SupervisorProc":
        self.config_dir.mkdir(parents=True, exist_ok=True)
        settings_path = self.data_dir.parent / f"{self.data_dir.name}-settings.toml"
        settings_path.write_text(tomli_w.dumps({"backoff_initial": 0.2, **self.settings}))
        self.output = self.data_dir.parent / f"{self.data_dir.name}-output.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TS_SUPERVISOR_DATA")}
        env.update(self.env)
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.output, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "supervisor", "run", "--no-console",
                 "--config-dir", str(self.config_dir), "--data-dir", str(self.data_dir),
                 "--settings", str(settings_path)],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=die_with_test)
        if wait:
            wait_for(lambda: self._answers() or self._died(), 30, "supervisor control socket")
        return self

    def _answers(self) -> bool:
        try:
            ipc.call(self.data_dir, "status", timeout=2)
            return True
        except (ipc.NotRunning, OSError, ValueError):
            return False

    def _died(self) -> bool:
        if self.proc and self.proc.poll() is not None:
            raise AssertionError(f"supervisor exited {self.proc.returncode}:\n{self.text()}")
        return False

    def text(self) -> str:
        return self.output.read_text(errors="replace") if self.output and self.output.exists() else ""

    # -- observation ---------------------------------------------------------

    def events(self) -> list[dict[str, Any]]:
        path = self.data_dir / "events.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def wait_event(self, pred: Callable[[dict[str, Any]], bool], timeout: float, what: str,
                   after: int = 0) -> dict[str, Any]:
        def find():
            self._died()
            evs = self.events()
            return next((e for e in evs[after:] if pred(e)), None)
        try:
            return wait_for(find, timeout, what, interval=0.02)
        except Timeout as e:
            tail = "\n".join(json.dumps(x) for x in self.events()[-20:])
            raise Timeout(f"{e}\nlast events:\n{tail}\noutput tail:\n{self.text()[-3000:]}") from None

    def wait_state(self, proxy: str, state: str, timeout: float = 30, after: int = 0) -> dict[str, Any]:
        return self.wait_event(lambda e: e["proxy"] == proxy and e["state"] == state, timeout,
                               f"{proxy} -> {state}", after=after)

    def status(self) -> dict[str, dict[str, Any]]:
        return {p["name"]: p for p in ipc.call(self.data_dir, "status")["proxies"]}

    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "supervisor", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)

    def children(self) -> list[psutil.Process]:
        if not self.proc or self.proc.poll() is not None:
            return []
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []

    # -- ending ----------------------------------------------------------------

    def stop(self, timeout: float = 30) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
            raise AssertionError(f"supervisor did not stop within {timeout}s:\n{self.text()[-3000:]}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(5)
