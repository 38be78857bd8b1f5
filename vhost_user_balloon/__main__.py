"""``python -m vhost_user_balloon`` and the ``vhost-user-balloon`` command.

The first word picks the program; only its module is imported, so that ``supervise``
and the operators' commands start without the daemon (trio, prometheus_client, the
serving code), in a fraction of its start-up time.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Final

_COMMANDS: Final = "vhost_user_balloon.daemon.commands"
#: The commands beside the daemon: the function that runs each with the rest of argv.
COMMANDS: Final = {
    "supervise": "vhost_user_balloon.daemon.supervise.supervisor:main",
    "status": f"{_COMMANDS}.status:main",
    "balloon": f"{_COMMANDS}.balloon:main",
    "migrate-prepare": f"{_COMMANDS}.migrate:prepare_command",
    "migrate-finish": f"{_COMMANDS}.migrate:finish_command",
    "reclaim": f"{_COMMANDS}.reclaim:main",
}
#: The daemon itself: any other first word is one of its options.
DAEMON: Final = "vhost_user_balloon.daemon.cli:main"


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        where, args = COMMANDS[argv[0]], argv[1:]
    else:
        where, args = DAEMON, argv
    module, _, function = where.partition(":")
    run: Callable[[list[str]], int] = getattr(importlib.import_module(module), function)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
