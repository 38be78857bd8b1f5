"""Automatic ballooning: from what the guests and the host report, the balloon target
each VM should have, and why. Pure code: no I/O, no clock, no trio; the daemon samples,
calls ``Policy.decide`` once per interval and applies the targets."""

from .auto import (
    DEFAULT_SHARES,
    Decision,
    Direction,
    GuestStats,
    GuestView,
    HostView,
    Policy,
    PolicyConfig,
    Round,
    floor_bytes,
)

__all__ = [
    "DEFAULT_SHARES",
    "Decision",
    "Direction",
    "GuestStats",
    "GuestView",
    "HostView",
    "Policy",
    "PolicyConfig",
    "Round",
    "floor_bytes",
]
