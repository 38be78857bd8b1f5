"""What operators run beside the daemon: ``status``, ``balloon``, ``migrate-prepare``
and ``migrate-finish`` (``migrate``, over QMP: ``qmp``), ``reclaim``, and the client
side of the control socket (``control``). Blocking code: they never import trio or
the daemon's serving parts, so each starts in a fraction of the daemon's time.
"""
