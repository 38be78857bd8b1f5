"""Fault injection for the restart test: a slow host, and a way to see a report in hand.

Python imports ``sitecustomize`` at start-up from ``PYTHONPATH``; the restart test puts
this folder there for the daemon it runs. Every batch of hole punches then announces
itself on stdout (a JSON line among the daemon's own) and takes 3 s longer, so the test
can kill the daemon while a free page report is certainly in its hands: the case the
next process must finish.
"""

import json
import sys
import time

from vhost_user_balloon.daemon.serving import discard

DELAY_S = 3.0
_execute = discard.execute


def _slow_execute(*args, **kwargs):  # type: ignore[no-untyped-def]
    sys.stdout.write(json.dumps({"event": "test_discard_begins"}) + "\n")
    sys.stdout.flush()
    time.sleep(DELAY_S)
    return _execute(*args, **kwargs)


discard.execute = _slow_execute
