"""One training run per workdir: an exclusive ``flock`` on ``<workdir>/train.lock``.

The holder writes its pid, host and start time into the file, so a second run can say who
holds it. The kernel releases a ``flock`` when its holder dies, however it dies (SIGKILL
included), so a lock file left by a killed run never blocks the next one. ``flock`` is
advisory and local: it does not guard a workdir shared over some network filesystems.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import socket
from typing import TextIO

from jattn.toy.errors import TrainerError

LOCK_FILE = "train.lock"


def lock_workdir(workdir: str) -> TextIO:
    """Take the workdir's lock, or raise ``TrainerError`` naming the run that holds it.

    Returns the open lock file: the lock is held until it is closed (or the process ends).
    """
    path = os.path.join(workdir, LOCK_FILE)
    f = open(path, "a+")  # a+: create it if needed, never truncate another holder's record
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "a run that has not written its pid yet"
        f.close()
        raise TrainerError(
            f"workdir {workdir!r} is in use by another train_toy.py run ({holder}; lock file "
            f"{path}); wait for it to finish or stop it, or use another --workdir"
        ) from None
    f.seek(0)
    f.truncate()
    started = datetime.datetime.now().isoformat(timespec="seconds")
    f.write(f"pid {os.getpid()} on host {socket.gethostname()}, started {started}\n")
    f.flush()
    return f
