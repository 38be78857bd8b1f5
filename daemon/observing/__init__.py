"""Observing the daemon: every metric it exports (``metrics``), the counters and
histograms that go on across restarts (``totals``), the ``/metrics`` endpoint
(``http``), and the one way a peer's problem is logged and counted (``problems``).
Imports only the protocol package and ``linux``.
"""
