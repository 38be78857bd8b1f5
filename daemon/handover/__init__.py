"""Keeping a VM's connection across a restart of the daemon, the daemon's side: the
fds held by a keeper and the state files beside them (``store``), and what one
connection saves and how the next process adopts it (``records``). Imports the
protocol package and ``linux`` only.
"""
