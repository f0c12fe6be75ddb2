"""The training loop behind ``train_toy.py``: set up, resume, train, evaluate, write outputs.

Outputs in ``workdir``: ``config.json``, ``metrics.jsonl``, ``summary.json``,
``attention.png``, ``grad_flow.png``, ``checkpoints/`` and ``train.lock``.

What ends a run early, always with a ``TrainerError`` whose message says what to do (exit
status 1 or 2 from ``train_toy.py``) and never with a checkpoint of a broken state: an invalid
config (before the workdir is created), a workdir held by another run, a ``config.json`` that
differs from the config or is unreadable, a checkpoint that cannot be resumed, and a NaN or an
infinity in the loss, a gradient or the state. Damaged checkpoints and ``metrics.jsonl`` lines
are set aside with a warning and the run resumes from the newest intact checkpoint. Ctrl-C or
SIGTERM to ``train_toy.py`` stops the run after its current step (``jattn.toy.interrupt``).

Several JAX processes (``train_toy.py --num_processes=...``, see ``jattn.toy.processes``):
each takes its own workdir lock; process 0 alone writes config.json, metrics.jsonl,
summary.json and the plots and prints progress; all of them train, checkpoint (orbax, each
process its shards) and evaluate together. A failed check in one process stops all of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time

import jax
import numpy as np
from tqdm import tqdm

from jattn.toy import checkpoint, data, gradcheck, interrupt, metrics, plots, processes, train, validation, workdir_lock
from jattn.toy import mesh as mesh_lib
from jattn.toy.errors import ConfigError, TrainerError

# Test hook: SIGKILL this process right after the given step is trained (and logged),
# before that step's checkpoint is written; used to test resuming after a crash.
KILL_ENV = "JATTN_TOY_SIGKILL_AFTER_STEP"


def _check_same_config(workdir: str, config) -> None:
    """Write config.json, or check a resumed run's config equals the one it started with."""
    path = os.path.join(workdir, "config.json")
    current = json.loads(config.to_json())
    if os.path.exists(path):
        saved = metrics.read_json_object(
            path, "it records the config this workdir was trained with. Restore it, or delete it to "
            "resume with the current --config, or use a fresh --workdir")
        if saved != current:
            fields = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
            raise TrainerError(
                f"workdir {workdir!r} holds a run of another config (fields differ: {fields}; see "
                f"{path}); use a fresh --workdir or the same config"
            )
    metrics.write_json(path, current)


def _make_workdir(workdir: str) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test.{jax.process_index()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise TrainerError(f"cannot write to --workdir {workdir!r} ({e.strerror or e}); "
                           "choose a writable directory") from None


class _FiniteGuard:
    """Collects each step's ``all_finite`` flag and checks them in one transfer, at boundaries.

    ``check`` raises ``TrainerError`` naming the first step whose loss, gradients or new state
    hold a NaN or an infinity; the loop calls it before it logs, checkpoints or finishes, so a
    broken state is never written.
    """

    def __init__(self, last_checkpoint: int):
        self.pending: list[tuple[int, dict]] = []  # (step, that step's metrics), unchecked
        self.last_checkpoint = last_checkpoint

    def check(self) -> None:
        flags = jax.device_get([m["all_finite"] for _, m in self.pending])
        bad = [(step, m) for (step, m), ok in zip(self.pending, flags) if not ok]
        self.pending.clear()
        if bad:
            step, m = bad[0]
            where = (f"step {self.last_checkpoint}" if self.last_checkpoint else "none yet")
            raise TrainerError(
                f"training diverged: step {step} produced a NaN or an infinity (loss="
                f"{float(m['loss']):.4g}, grad_norm/global={float(m['grad_norm/global']):.4g}); stopped "
                f"before writing any checkpoint of it (newest checkpoint: {where}). Lower "
                "config.learning_rate or config.grad_clip_norm, or raise config.warmup_steps, "
                "and train in a fresh --workdir"
            )


def _floats(tree: dict) -> dict:
    return {k: float(v) for k, v in jax.device_get(tree).items()}


def _show_samples(batch: data.Batch, outputs: np.ndarray, config) -> None:
    expected = np.asarray(data.expected_outputs(batch, config.seq_len))
    prompts = np.asarray(data.prompts(batch, config.seq_len))
    for i in range(min(config.num_samples_to_print, outputs.shape[0])):
        verdict = "CORRECT" if np.array_equal(outputs[i], expected[i]) else "INCORRECT"
        tqdm.write(f"  {data.symbols_text(prompts[i])} -> {data.symbols_text(outputs[i])}   {verdict}")


def run(config, workdir: str, stop: interrupt.StopOnSignal | None = None) -> dict:
    """Train ``config`` in ``workdir`` (resuming from its newest intact checkpoint); returns the
    summary (in process 0; the other processes of a multi-process run return a short dict).

    ``stop``: entered signal handlers (``train_toy.py`` passes them); the run checks them after
    setup and after every step, and raises ``interrupt.Interrupted`` once a signal arrived.
    Without it a Ctrl-C is Python's ``KeyboardInterrupt`` (as in a notebook).

    Raises ``ConfigError`` before the workdir is created if the config cannot run here, and
    ``TrainerError`` for the other failures listed in the module docstring.
    """
    start_time = time.time()
    validation.validate(config)
    try:
        mesh = mesh_lib.make_mesh(config.mesh, config.batch_size)
        mesh_lib.check_divides(mesh, "num_eval_sequences", config.num_eval_sequences)
    except ValueError as e:
        raise ConfigError(f"invalid config:\n  {e}") from None
    processes.everywhere("creating the workdir", _make_workdir, workdir)
    lock = processes.everywhere("locking the workdir", workdir_lock.lock_workdir, workdir, jax.process_index())
    with contextlib.closing(lock):
        return _train(config, workdir, mesh, start_time, stop or interrupt.StopOnSignal())


def _say(*args, **kwargs) -> None:
    """``print`` in process 0 only (progress is shown once, not once per process)."""
    if processes.is_primary():
        print(*args, **kwargs)


def _train(config, workdir: str, mesh, start_time: float, stop: interrupt.StopOnSignal) -> dict:
    primary = processes.is_primary()
    processes.everywhere("checking config.json", lambda: _check_same_config(workdir, config) if primary else None)
    _say(f"workdir: {workdir}")
    _say(f"task: {config.task}, seq_len={config.seq_len}, vocab_size={config.vocab_size}; "
         f"devices: {mesh.devices.size} x {jax.devices()[0].platform} (mesh {dict(mesh.shape)}"
         f"{f', {jax.process_count()} processes' if jax.process_count() > 1 else ''})")
    if config.check_grads:
        _say(gradcheck.check_attention_grads(config.seed))

    graphdef, state = train.create_train_state(config, mesh)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   max_to_keep=config.max_checkpoints_to_keep)
    try:
        for path in ckpt.discarded:
            _say(f"discarded incomplete checkpoint {path}")
        start, state = ckpt.restore_latest(like=state)
        if start:
            _say(f"resumed from checkpoint at step {start}")
        _say(f"model: {config.num_layers} layers, d_model={config.d_model}, {config.num_heads} heads, "
             f"{num_params:,} parameters")
        log = metrics.MetricsLog(os.path.join(workdir, "metrics.jsonl"), resume_step=start) if primary else None
        steps = train.jit_steps(config, graphdef, mesh)
        heldout_host = jax.tree.map(np.asarray, data.eval_batch(
            config.seed, num_sequences=config.num_eval_sequences, seq_len=config.seq_len,
            vocab_size=config.vocab_size, task=config.task))  # the same in every process
        heldout = jax.tree.map(lambda x: processes.global_array(x, mesh_lib.batch_sharded(mesh)), heldout_host)
        kill_after = int(os.environ.get(KILL_ENV) or -1)

        def evaluate(step: int) -> dict:
            result, outputs = steps.eval_step(state.params, heldout)
            result = _floats(result)
            if primary:
                tqdm.write(f"eval @ step {step}: held-out seq_accuracy={result['seq_accuracy']:.4f} "
                           f"token_accuracy={result['token_accuracy']:.4f} (greedy decoding)")
                _show_samples(heldout_host, np.asarray(outputs), config)  # outputs: replicated
            return result

        total = config.num_train_steps
        guard = _FiniteGuard(last_checkpoint=start)
        stop.check(start, workdir)
        bar = tqdm(range(start, total), initial=start, total=total, desc="train", unit="step", disable=not primary)
        for step in bar:
            state, step_metrics = steps.train_step(state, steps.train_batch(step))
            done = step + 1  # optimizer steps taken
            guard.pending.append((done, step_metrics))
            is_eval = done % config.eval_every_steps == 0 and done != total  # the end evaluates below
            is_log = done % config.log_every_steps == 0 or done == total or is_eval
            is_checkpoint = done % config.checkpoint_every_steps == 0 or done == total
            if is_log or is_checkpoint:
                guard.check()  # before anything of this state is logged or written
            if is_log:
                row = {"step": done, **_floats({k: v for k, v in step_metrics.items() if k != "all_finite"})}
                if is_eval:
                    row.update({f"eval/{k}": v for k, v in evaluate(done).items()})
                if log is not None:
                    log.append(row)
                bar.set_postfix(loss=f"{row['loss']:.3g}", acc=f"{row['token_accuracy']:.3f}")
            if done == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            if is_checkpoint:
                ckpt.save(done, state)
                guard.last_checkpoint = done
            stop.check(done, workdir)
        bar.close()
    finally:
        ckpt.close()

    final = evaluate(total)
    if not primary:
        return {"num_train_steps": total, "resumed_from_step": start, "process_index": jax.process_index()}
    rows = log.rows()
    example = heldout_host.inputs[:1]  # [1, T]; on this process's first device
    weights = np.asarray(steps.attention_maps(state.params, example))[:, 0]  # [layers, N, T, T]
    labels = data.symbols_text(np.asarray(example[0])).split()
    plots.plot_attention(weights, labels, os.path.join(workdir, "attention.png"),
                         f"{config.task}: attention of a held-out example after {total} steps")
    plots.plot_grad_flow(rows, config.num_layers, os.path.join(workdir, "grad_flow.png"))
    summary = {
        "num_train_steps": total,
        "final_loss": rows[-1]["loss"],  # the last step is always logged
        "token_accuracy": final["token_accuracy"],
        "seq_accuracy": final["seq_accuracy"],
        "eval_loss": final["eval_loss"],
        "num_eval_sequences": config.num_eval_sequences,
        "resumed_from_step": start,
        "num_devices": int(mesh.devices.size),
        "num_processes": jax.process_count(),
        "wall_seconds": time.time() - start_time,
    }
    metrics.write_json(os.path.join(workdir, "summary.json"), summary)
    _say(f"done: seq_accuracy={summary['seq_accuracy']:.4f} on {config.num_eval_sequences} held-out "
         f"sequences, final loss {summary['final_loss']:.3g}, {summary['wall_seconds']:.1f}s wall")
    _say(f"wrote metrics.jsonl, summary.json, attention.png, grad_flow.png, checkpoints/ in {workdir}")
    return summary
