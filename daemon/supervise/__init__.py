"""``vhost-user-balloon supervise``, the keeper process: it runs the daemon, keeps a
copy of every fd it hands over, and starts the next one (``supervisor``), ready ahead
of time (``standby``). It imports ``linux`` only (no protocol, no trio), so that it
starts fast and has little in it to crash or to upgrade.
"""
