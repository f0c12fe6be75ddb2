"""One training run per workdir: an exclusive ``flock`` on ``<workdir>/train.lock``.

The holder writes its pid, host and start time into the file, so a second run can say who
holds it. The kernel releases a ``flock`` when its holder dies, however it dies (SIGKILL
included), so a lock file left by a killed run never blocks the next one. ``flock`` is
advisory and local: it does not guard a workdir shared over some network filesystems.

A run of several JAX processes (``jax.distributed``) takes one lock per process index:
process 0 ``train.lock`` (so a one-process run and a many-process run on one workdir exclude
each other), process i > 0 ``train.lock.process-<i>``. The processes of one run therefore
never block each other, and a second run blocks on the lock of each of its processes.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import socket
from typing import TextIO

from jattn.toy.errors import TrainerError

LOCK_FILE = "train.lock"


def lock_path(workdir: str, process_index: int = 0) -> str:
    """The lock file of process ``process_index`` of a run in ``workdir``."""
    name = LOCK_FILE if process_index == 0 else f"{LOCK_FILE}.process-{process_index}"
    return os.path.join(workdir, name)


def lock_workdir(workdir: str, process_index: int = 0) -> TextIO:
    """Take the workdir's lock of ``process_index``, or raise ``TrainerError`` naming the run
    that holds it.

    Returns the open lock file: the lock is held until it is closed (or the process ends).
    """
    path = lock_path(workdir, process_index)
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
    who = "" if process_index == 0 else f", process {process_index}"
    f.write(f"pid {os.getpid()} on host {socket.gethostname()}{who}, started {started}\n")
    f.flush()
    return f
