"""One way to log and count a problem a peer caused: a structured log line with the
error's reason slug and values, and ``protocol_errors_total{vm,reason}``."""

from __future__ import annotations

from typing import Literal

import structlog

from vhost_user_balloon.protocol import VhostUserError

from .metrics import VmMetrics

__all__ = ["report_problem"]

log = structlog.get_logger()


def report_problem(
    metrics: VmMetrics,
    event: str,
    err: VhostUserError,
    *,
    level: Literal["warning", "error"] = "warning",
    **context: object,
) -> None:
    """Log ``event`` with what ``err`` says (``context`` first: the queue, say) and
    count it under the error's reason."""
    emit = log.error if level == "error" else log.warning
    emit(event, **context, reason=err.reason, error=str(err), **err.values)
    metrics.protocol_error(err.reason)
