"""Orbax checkpoints of the training state, and resuming from the latest complete one.

Why a partly written checkpoint is never loaded: orbax writes step ``n`` into a temporary
directory (``<n>.orbax-checkpoint-tmp-*``) and renames it to ``<n>`` only after every file
is written, and its last file before the (atomic, on a local filesystem) rename is
``commit_success.txt``. A run killed mid-save therefore leaves only a tmp directory, which
orbax ignores (and removes when the manager opens, ``cleanup_tmp_directories``).
Opening a ``Checkpointer`` additionally deletes any ``<n>`` step directory without
``commit_success.txt`` (not written by a finished orbax save), so it can neither be loaded
nor block a later save of step ``n``. Saves are synchronous: a checkpoint
is complete before training goes on.
"""

from __future__ import annotations

import os
import pathlib
import shutil

import jax
import orbax.checkpoint as ocp

COMMIT_FILE = "commit_success.txt"  # orbax's marker, written just before the final rename


class Checkpointer:
    def __init__(self, directory: str, *, max_to_keep: int):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=False,
        )
        self._directory = pathlib.Path(os.path.abspath(directory))
        self._manager = ocp.CheckpointManager(self._directory, options=options)
        self.discarded = self._discard_incomplete()

    def _discard_incomplete(self) -> list[str]:
        """Delete step directories that lack orbax's commit marker; return their paths."""
        doomed = [self._directory / str(s) for s in self._manager.all_steps()]
        doomed = [str(p) for p in doomed if not (p / COMMIT_FILE).is_file()]
        for path in doomed:
            shutil.rmtree(path)
        if doomed:
            self._manager.reload()
        return doomed

    def complete_steps(self) -> list[int]:
        """Steps of finished checkpoints, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None."""
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state) -> None:
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self._manager.wait_until_finished()

    def restore(self, step: int, like):
        """Restore ``step`` into the structure, dtypes and shardings of the pytree ``like``."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like
        )
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        self._manager.close()
