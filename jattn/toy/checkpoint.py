"""Orbax checkpoints of the training state, verified when written and when read back.

A checkpoint of step ``n`` is orbax's step directory ``<n>/`` plus ``<n>/jattn_manifest.json``,
which holds the SHA-256 of every file orbax wrote and of every array of the saved state.

Saving (``save``): a state with a NaN or an infinity is refused. Orbax writes ``<n>`` into a
temporary directory and renames it to ``<n>`` only after every file is written (its last file
before the rename is ``commit_success.txt``); then the manifest is written (temporary file and
rename), and the checkpoint is read back and compared with the state. Only then are checkpoints
older than the newest ``max_to_keep`` deleted (this class, not orbax, does the rotation), so the
last verified checkpoint is never deleted while a newer one is unverified. SIGINT and SIGTERM
that arrive during a save are delivered once it is complete.

Resuming (``restore_latest``): checkpoints are tried newest first. One whose files do not match
its manifest (changed, truncated, missing or extra files, no manifest) or whose restored arrays
do not match it is moved to ``damaged_checkpoints/`` next to the checkpoint directory, with a
warning naming it, and the next older one is tried. A run killed mid-save leaves an orbax
temporary directory (removed when the manager opens, ``cleanup_tmp_directories``), a step
directory without orbax's commit marker (deleted here) or, killed between orbax's commit and
the manifest, a step without a manifest (set aside as damaged); none of them is ever loaded.

Several JAX processes (``jax.distributed``, see ``jattn.toy.processes``): every process calls
``save`` and ``restore_latest``. Orbax's save is collective (each process writes the shards
it holds; process 0 commits the step directory once all have written, behind a barrier).
Process 0 alone writes the manifest, deletes incomplete steps, rotates and moves damaged
checkpoints aside, each followed by a barrier after which every process re-reads the
directory. Every process checks the files against the manifest and its restored arrays, and
the processes agree on the verdict: a checkpoint is used only if it is intact in all of them,
so all of them resume from the same step. The state's arrays are compared as a whole, so
they must be fully replicated (the trainer's are) or fully addressable in each process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import signal
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp

from jattn.toy import processes
from jattn.toy.errors import TrainerError, warn

COMMIT_FILE = "commit_success.txt"  # orbax's marker, written just before the final rename
MANIFEST = "jattn_manifest.json"  # written by this module once orbax has committed the step
_DELETING = ".orbax-checkpoint-tmp-deleting"  # a tmp-directory name: orbax removes leftovers


class DamagedCheckpoint(Exception):
    """A checkpoint that does not match its manifest (the message says how)."""


def _sha256_file(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_digests(step_dir: pathlib.Path) -> dict[str, str]:
    """SHA-256 of every file under ``step_dir`` but the manifest, by relative path."""
    files = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {str(p.relative_to(step_dir)): _sha256_file(p) for p in files}


def _array_digests(state) -> dict[str, str]:
    """SHA-256 of dtype, shape and bytes of every array of ``state``, by pytree path."""
    digests = {}
    for path, x in jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]:
        x = np.ascontiguousarray(x)
        h = hashlib.sha256(f"{x.dtype}{x.shape}".encode())
        h.update(x.tobytes())
        digests[jax.tree_util.keystr(path)] = h.hexdigest()
    return digests


def _non_finite_leaves(state) -> list[str]:
    """Pytree paths of the arrays of ``state`` that hold a NaN or an infinity."""
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
    return [jax.tree_util.keystr(p) for p, x in leaves if not np.all(np.isfinite(np.asarray(x)))]


def _first_line(error: Exception) -> str:
    """The first line of ``error``'s message; if long, its start and its end (the OS's cause)."""
    lines = str(error).strip().splitlines()
    line = lines[0] if lines else ""
    return line if len(line) <= 300 else f"{line[:100]} ... {line[-200:]}"


def _write_atomically(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT and SIGTERM until the block ends, then deliver them (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda num, frame: received.append(num)) for s in sigs}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(received):
            signal.raise_signal(s)


class Checkpointer:
    def __init__(self, directory: str, *, max_to_keep: int):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # rotation is done by _prune, after the newest is verified
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=False,
        )
        self._directory = pathlib.Path(os.path.abspath(directory))
        self._damaged_dir = self._directory.parent / "damaged_checkpoints"
        self._max_to_keep = max_to_keep
        self._manager = ocp.CheckpointManager(self._directory, options=options)
        self.discarded = self._discard_incomplete()

    def _step_dir(self, step: int) -> pathlib.Path:
        return self._directory / str(step)

    def _discard_incomplete(self) -> list[str]:
        """Delete step directories that lack orbax's commit marker (process 0); return their paths."""
        doomed = []
        if processes.is_primary():
            doomed = [self._step_dir(s) for s in self._manager.all_steps()]
            doomed = [str(p) for p in doomed if not (p / COMMIT_FILE).is_file()]
            for path in doomed:
                shutil.rmtree(path)
        self._changed("discard")
        return doomed

    def _changed(self, what: str) -> None:
        """After process 0 changed the directory: wait for it, then every process re-reads it."""
        processes.barrier(f"checkpoints:{what}")
        self._manager.reload()

    def complete_steps(self) -> list[int]:
        """Steps of finished checkpoints, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None."""
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state) -> None:
        """Save ``state`` as step ``step``, verify it, then delete checkpoints beyond ``max_to_keep``.

        Raises ``TrainerError`` (and saves nothing) if ``state`` holds a NaN or an infinity, and
        (deleting nothing) if the checkpoint read back differs from ``state``.
        """
        bad = _non_finite_leaves(state)
        if bad:
            raise TrainerError(f"refusing to checkpoint step {step}: non-finite values in {', '.join(bad[:5])}")
        arrays = _array_digests(state)
        with _signals_deferred():
            step_dir = self._step_dir(step)
            error = None
            try:
                self._manager.save(step, args=ocp.args.StandardSave(state), force=True)  # collective
                self._manager.wait_until_finished()
                if processes.is_primary():
                    manifest = {"step": step, "files": _file_digests(step_dir), "arrays": arrays}
                    _write_atomically(step_dir / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
            except Exception as e:  # orbax/tensorstore errors have no common base class
                error = e
            # A collective: every process learns whether all wrote, and waits for the manifest.
            failed = processes.failed_processes(error is None)
            if failed:
                if processes.is_primary():
                    self._remove_unfinished(step)
                why = (f"{type(error).__name__}: {_first_line(error)}" if error is not None
                       else f"it failed in process(es) {failed}; their output says why")
                raise TrainerError(
                    f"could not write checkpoint {step_dir} ({why}); it was removed and the older "
                    "checkpoints are intact. Free disk space (or fix the directory's permissions) and "
                    "run again to resume"
                ) from None
            try:
                self.restore(step, like=state)
            except DamagedCheckpoint as e:
                raise TrainerError(
                    f"checkpoint {step_dir} differs from the state just saved ({e}); older checkpoints "
                    "were kept. Is the disk failing? Check it, then run again to resume"
                ) from None
            self._prune()

    def _remove_unfinished(self, step: int) -> None:
        """Delete what a failed save of ``step`` left: its directory and orbax's temporary ones."""
        for path in [self._step_dir(step), *self._directory.glob(f"{step}.orbax-checkpoint-tmp*")]:
            shutil.rmtree(path, ignore_errors=True)
        self._manager.reload()

    def _prune(self) -> None:
        """Delete all but the newest ``max_to_keep`` checkpoints (each renamed away first)."""
        if processes.is_primary():
            for step in self.complete_steps()[: -self._max_to_keep]:
                doomed = self._directory / f"{step}{_DELETING}"
                os.rename(self._step_dir(step), doomed)
                shutil.rmtree(doomed)
        self._changed("prune")

    def _check_files(self, step: int) -> dict:
        """The manifest of ``step`` once every file matches it; else raise ``DamagedCheckpoint``."""
        step_dir = self._step_dir(step)
        try:
            manifest = json.loads((step_dir / MANIFEST).read_text())
            expected, arrays = manifest["files"], manifest["arrays"]
        except FileNotFoundError:
            raise DamagedCheckpoint(f"{MANIFEST} is missing (the save never finished)") from None
        except (ValueError, KeyError, TypeError) as e:
            raise DamagedCheckpoint(f"{MANIFEST} is unreadable ({type(e).__name__}: {e})") from None
        if manifest.get("step") != step:
            raise DamagedCheckpoint(f"{MANIFEST} describes step {manifest.get('step')!r}")
        actual = _file_digests(step_dir)
        for name in sorted(set(expected) | set(actual)):
            if name not in actual:
                raise DamagedCheckpoint(f"file {name} is missing")
            if name not in expected:
                raise DamagedCheckpoint(f"file {name} was not written by the save")
            if actual[name] != expected[name]:
                raise DamagedCheckpoint(f"file {name} has changed since it was saved (SHA-256 differs)")
        return arrays

    def restore(self, step: int, like):
        """Restore ``step`` into the structure, dtypes and shardings of the pytree ``like``.

        Raises ``DamagedCheckpoint`` unless every file and every restored array matches the
        checkpoint's manifest in every process, and ``TrainerError`` if intact files do not fit
        ``like``. Collective: every process calls it with the same ``step``.
        """
        arrays = self._agreed(self._check_files, step)
        state = self._agreed(self._restore_arrays, step, like, arrays)
        return state

    def _agreed(self, check, *args):
        """``check(*args)`` with the verdict of all processes: if it raised ``TrainerError`` in
        any process, every process raises one; else if it raised ``DamagedCheckpoint`` in any,
        every process raises that; else its result."""
        error, code = None, 0  # code: 0 ok, 1 damaged, 2 cannot go on
        try:
            result = check(*args)
        except DamagedCheckpoint as e:
            error, code = e, 1
        except TrainerError as e:
            error, code = e, 2
        codes = processes.gather(code)
        worst = max(codes)
        if error is not None and code == worst:
            raise error
        others = [i for i, c in enumerate(codes) if c == worst]
        if worst == 2:
            raise TrainerError(f"reading checkpoint {self._step_dir(args[0])} failed in process(es) {others} "
                               "(their output says why)")
        if worst == 1:
            raise DamagedCheckpoint(f"process(es) {others} found it damaged (their output says how)")
        return result

    def _restore_arrays(self, step: int, like, arrays: dict):
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like
        )
        try:
            state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # orbax/tensorstore errors have no common base class
            raise TrainerError(
                f"checkpoint {self._step_dir(step)} is intact but does not fit this model "
                f"({type(e).__name__}: {_first_line(e)}); was it written by another version of the "
                "trainer? Use a fresh --workdir"
            ) from e
        if _array_digests(state) != arrays:
            raise DamagedCheckpoint("the restored arrays differ from the saved ones (SHA-256)")
        return state

    def restore_latest(self, like):
        """``(step, state)`` of the newest intact checkpoint, or ``(0, like)`` if there is none yet.

        Damaged checkpoints are moved to ``damaged_checkpoints/`` with a warning naming each;
        if every checkpoint is damaged, raises ``TrainerError`` saying so.
        """
        moved = []
        steps = self.complete_steps()
        processes.same_everywhere(f"checkpoints in {self._directory}", steps)
        for step in reversed(steps):
            try:
                return step, self.restore(step, like)
            except DamagedCheckpoint as e:
                moved.append(self._quarantine(step, str(e)))
        if moved:
            raise TrainerError(
                f"no intact checkpoint is left in {self._directory} (the {len(moved)} damaged ones were "
                f"moved to {self._damaged_dir}). Run again to start over from step 0, or use a fresh "
                "--workdir"
            )
        return 0, like

    def _quarantine(self, step: int, why: str) -> str:
        source = self._step_dir(step)
        target, n = self._damaged_dir / str(step), 1
        while target.exists():
            n += 1
            target = self._damaged_dir / f"{step}-{n}"
        processes.barrier(f"checkpoints:checked-{step}")  # no process reads it any more
        if processes.is_primary():
            self._damaged_dir.mkdir(exist_ok=True)
            os.rename(source, target)
        self._changed(f"quarantine-{step}")
        warn(f"checkpoint {source} is damaged: {why}. Moved it to {target}; trying an older checkpoint")
        return str(target)

    def close(self) -> None:
        self._manager.close()
