"""Running the automatic balloon policy (``vhost_user_balloon.policy``) inside the
daemon: each interval, a view of every VM and of the host (``hostmem``) in, targets
out (``runner``). It reaches the VMs through a small interface, not through the
serving code.
"""
