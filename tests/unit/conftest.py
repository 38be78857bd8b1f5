"""Hypothesis profiles: deterministic and bounded in the normal suite ("ci"), long and
random for scripts/fuzz ("fuzz"; VUB_FUZZ_EXAMPLES examples per property)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=300, derandomize=True, deadline=None, print_blob=True)
settings.register_profile(
    "fuzz",
    max_examples=int(os.environ.get("VUB_FUZZ_EXAMPLES", "200000")),
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("VUB_HYPOTHESIS_PROFILE", "ci"))
