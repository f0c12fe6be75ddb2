"""The training loop behind ``train_toy.py``: set up, resume, train, evaluate, write outputs.

Outputs in ``workdir``: ``config.json``, ``metrics.jsonl``, ``summary.json``,
``attention.png``, ``grad_flow.png`` and ``checkpoints/``.
"""

from __future__ import annotations

import json
import os
import signal
import time

import jax
import numpy as np
from tqdm import tqdm

from jattn.toy import checkpoint, data, gradcheck, metrics, plots, train, validation
from jattn.toy import mesh as mesh_lib

# Test hook: SIGKILL this process right after the given step is trained (and logged),
# before that step's checkpoint is written; used to test resuming after a crash.
KILL_ENV = "JATTN_TOY_SIGKILL_AFTER_STEP"


def _check_same_config(workdir: str, config) -> None:
    """Write config.json, or check a resumed run's config equals the one it started with."""
    path = os.path.join(workdir, "config.json")
    current = json.loads(config.to_json())
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != current:
            fields = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
            raise ValueError(
                f"workdir {workdir!r} holds a run of another config (fields differ: {fields}); "
                "use a fresh --workdir or the same config"
            )
    metrics.write_json(path, current)


def _floats(tree: dict) -> dict:
    return {k: float(v) for k, v in jax.device_get(tree).items()}


def _show_samples(batch: data.Batch, outputs: np.ndarray, config) -> None:
    expected = np.asarray(data.expected_outputs(batch, config.seq_len))
    prompts = np.asarray(data.prompts(batch, config.seq_len))
    for i in range(min(config.num_samples_to_print, outputs.shape[0])):
        verdict = "CORRECT" if np.array_equal(outputs[i], expected[i]) else "INCORRECT"
        tqdm.write(f"  {data.symbols_text(prompts[i])} -> {data.symbols_text(outputs[i])}   {verdict}")


def run(config, workdir: str) -> dict:
    """Train ``config`` in ``workdir`` (resuming from its latest complete checkpoint)."""
    validation.validate(config)
    start_time = time.time()
    os.makedirs(workdir, exist_ok=True)
    _check_same_config(workdir, config)
    mesh = mesh_lib.make_mesh(config.mesh, config.batch_size)
    mesh_lib.check_divides(mesh, "num_eval_sequences", config.num_eval_sequences)
    print(f"workdir: {workdir}")
    print(f"task: {config.task}, seq_len={config.seq_len}, vocab_size={config.vocab_size}; "
          f"devices: {mesh.devices.size} x {jax.devices()[0].platform} (mesh {dict(mesh.shape)})")
    if config.check_grads:
        print(gradcheck.check_attention_grads(config.seed))

    graphdef, state = train.create_train_state(config, mesh)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   max_to_keep=config.max_checkpoints_to_keep)
    for path in ckpt.discarded:
        print(f"discarded incomplete checkpoint {path}")
    start = ckpt.latest_step() or 0
    if start:
        state = ckpt.restore(start, like=state)
        print(f"resumed from checkpoint at step {start}")
    print(f"model: {config.num_layers} layers, d_model={config.d_model}, {config.num_heads} heads, "
          f"{num_params:,} parameters")
    log = metrics.MetricsLog(os.path.join(workdir, "metrics.jsonl"), resume_step=start)
    steps = train.jit_steps(config, graphdef, mesh)
    heldout = jax.device_put(
        data.eval_batch(config.seed, num_sequences=config.num_eval_sequences, seq_len=config.seq_len,
                        vocab_size=config.vocab_size, task=config.task),
        mesh_lib.batch_sharded(mesh),
    )
    kill_after = int(os.environ.get(KILL_ENV) or -1)

    def evaluate(step: int) -> dict:
        result, outputs = steps.eval_step(state.params, heldout)
        result = _floats(result)
        tqdm.write(f"eval @ step {step}: held-out seq_accuracy={result['seq_accuracy']:.4f} "
                   f"token_accuracy={result['token_accuracy']:.4f} (greedy decoding)")
        _show_samples(heldout, np.asarray(outputs), config)
        return result

    total = config.num_train_steps
    bar = tqdm(range(start, total), initial=start, total=total, desc="train", unit="step")
    for step in bar:
        state, step_metrics = steps.train_step(state, steps.train_batch(step))
        done = step + 1  # optimizer steps taken
        is_eval = done % config.eval_every_steps == 0 and done != total  # the end evaluates below
        if done % config.log_every_steps == 0 or done == total or is_eval:
            row = {"step": done, **_floats(step_metrics)}
            if is_eval:
                row.update({f"eval/{k}": v for k, v in evaluate(done).items()})
            log.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3g}", acc=f"{row['token_accuracy']:.3f}")
        if done == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        if done % config.checkpoint_every_steps == 0 or done == total:
            ckpt.save(done, state)
    bar.close()
    ckpt.close()

    final = evaluate(total)
    rows = log.rows()
    example = heldout.inputs[:1]  # [1, T]
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
        "wall_seconds": time.time() - start_time,
    }
    metrics.write_json(os.path.join(workdir, "summary.json"), summary)
    print(f"done: seq_accuracy={summary['seq_accuracy']:.4f} on {config.num_eval_sequences} held-out "
          f"sequences, final loss {summary['final_loss']:.3g}, {summary['wall_seconds']:.1f}s wall")
    print(f"wrote metrics.jsonl, summary.json, attention.png, grad_flow.png, checkpoints/ in {workdir}")
    return summary
