"""``python -m vhost_user_balloon``: the same as the ``vhost-user-balloon`` command."""

import sys

from vhost_user_balloon.daemon.cli import main

sys.exit(main())
