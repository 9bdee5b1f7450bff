"""One way every ``visor`` command reports what the user can fix: ``visor <command>: error: <what>``, on stderr,
exit status 2, no traceback (``VISOR_TRACEBACK=1`` re-raises, to see where it came from)."""

from __future__ import annotations

import os
import sys

TRACEBACK_ENV = "VISOR_TRACEBACK"
HINT = f"(set {TRACEBACK_ENV}=1 to see where it was raised)"


def report(command: str, e: BaseException, message: str | None = None) -> int:
    """Print ``e`` (or ``message``, the part of it a user acts on) as a user error of ``visor <command>`` and return
    2; call it inside the ``except`` block."""
    if os.environ.get(TRACEBACK_ENV):
        raise e
    print(f"visor {command}: error: {message or e}\n{HINT}", file=sys.stderr)
    return 2
