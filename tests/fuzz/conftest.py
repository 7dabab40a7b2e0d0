"""Hypothesis profiles for the fuzz suites (one file per input surface).

- "ci" (default): a fixed, derandomized example budget, so CI is
  reproducible and bounded in time;
- "fuzz": random seeds and a large budget; `scripts/fuzz --minutes N` runs
  each surface under it, again and again, for N minutes.

Every surface asserts the same property: no exception escapes the pure
function that takes the input; a bad file is one ConfigError line; a bad
frame or request closes one connection.
"""
from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                     HealthCheck.data_too_large,
                                                     HealthCheck.filter_too_much])
settings.register_profile("ci", max_examples=int(os.environ.get("TS_FUZZ_EXAMPLES", "150")),
                          derandomize=True, database=None, print_blob=True, **_common)
settings.register_profile("fuzz", max_examples=int(os.environ.get("TS_FUZZ_ROUND_EXAMPLES", "2000")), derandomize=False, database=None,
                          print_blob=True, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
