"""``python -m vhost_user_balloon`` and the ``vhost-user-balloon`` command.

``supervise`` is sent on before the daemon is imported: the supervisor needs little
of it, and starts faster without the rest.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["supervise"]:
        from vhost_user_balloon.daemon import supervisor  # noqa: PLC0415 - see above

        return supervisor.main(argv[1:])
    from vhost_user_balloon.daemon import cli  # noqa: PLC0415 - see above

    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
