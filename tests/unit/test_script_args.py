"""The measuring scripts refuse bad arguments with one usage line and exit 2,
before they enter a namespace or start anything (a `--sizes 0` once waited
for zero proxies to be running until its deadline)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.supervisor_harness import ROOT

CASES = [
    ("bench", ["--sizes", "0"], "--sizes: every fleet size must be at least 1"),
    ("bench", ["--sizes", "10,-5"], "--sizes: every fleet size must be at least 1"),
    ("bench", ["--sizes", ","], "--sizes: every fleet size must be at least 1"),
    ("bench", ["--sizes", "abc"], "is not a comma-separated list of whole numbers"),
    ("bench", ["--sizes", "1,2.5"], "is not a comma-separated list of whole numbers"),
    ("bench", ["--peers", "clients,nobody"], "--peers: nobody is not a policy"),
    ("bench", ["--runs", "0"], "--runs must be at least 1"),
    ("bench", ["--window", "-1"], "--window positive"),
    ("soak", ["--proxies", "0"], "--proxies at least 1"),
    ("soak", ["--sample", "0"], "--sample and --churn must be positive"),
    ("soak", ["--churn", "-3"], "--sample and --churn must be positive"),
    ("soak", ["--hours", "-1"], "--hours (or --minutes) must be positive"),
    ("soak", ["--minutes", "0"], "--hours (or --minutes) must be positive"),
    ("soak", ["--warmup", "-2"], "--warmup not negative"),
]


@pytest.mark.parametrize(("script", "argv", "said"), CASES, ids=[f"{s} {' '.join(a)}" for s, a, _ in CASES])
def test_a_bad_argument_is_one_usage_line(script: str, argv: list[str], said: str):
    out = subprocess.run([sys.executable, "-m", f"scripts.{script}", *argv], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"scripts/{script}: error: ") and said in last, out.stderr
    assert "Traceback" not in out.stderr
