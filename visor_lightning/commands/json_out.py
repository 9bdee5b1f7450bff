"""``--json``: exactly one JSON document on stdout, everything else (Rich tables, progress, library chatter) on
stderr, so ``visor eval ... --json | jq`` works."""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO


@contextmanager
def stdout_for_json(enabled: bool = True) -> Iterator[TextIO]:
    """While open, stdout is sent to stderr, at the file-descriptor level when stdout is the process's fd 1 (so
    C extensions and child processes follow) and at the ``sys.stdout`` level otherwise (a captured stream).
    Yields the real stdout: the one place the JSON document is written to."""
    if not enabled:
        yield sys.stdout
        return
    old = sys.stdout
    old.flush()
    try:
        fd_level = old.fileno() == 1
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        fd_level = False
    if not fd_level:
        sys.stdout = sys.stderr
        try:
            yield old
        finally:
            sys.stdout = old
        return
    saved = os.dup(1)
    real = os.fdopen(saved, "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        yield real
    finally:
        sys.stderr.flush()
        sys.stdout = old
        real.flush()
        os.dup2(saved, 1)
        real.close()


def emit(doc: Any, stream: TextIO) -> None:
    """Write the one JSON document (and a newline) and flush it."""
    stream.write(json.dumps(doc, indent=2) + "\n")
    stream.flush()
