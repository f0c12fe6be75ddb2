"""The trainer's user-facing failures, and its warnings.

``train_toy.py`` prints a ``TrainerError``'s message alone (no traceback) and exits with its
``exit_code``; every message names the field or file at fault and says what to do.
"""

from __future__ import annotations

import sys


class TrainerError(Exception):
    """A failure the user can act on (a damaged file, a locked workdir, a diverged run)."""

    exit_code = 1


class ConfigError(TrainerError, ValueError):
    """An invalid config, found before the workdir is created or anything compiles."""

    exit_code = 2


def warn(message: str) -> None:
    """Print ``message`` to stderr as a warning, at once."""
    print(f"WARNING: {message}", file=sys.stderr, flush=True)
