"""Toy trainer: a run SIGKILLed mid-training and restarted ends exactly like an uninterrupted one.

Runs ``train_toy.py`` in subprocesses with ``configs/tiny.py`` shortened to 12 steps,
checkpointing every 5, and compares with the same 12 steps taken here without interruption. The killed run dies right after step 8 (``JATTN_TOY_SIGKILL_AFTER_STEP``),
after logging it and before any later checkpoint; before restarting we also leave two fake
incomplete checkpoints (an orbax tmp directory and a step directory without orbax's commit
marker) that must not be loaded.
"""

import json
import os
import pathlib
import runpy
import signal
import subprocess
import sys

import numpy as np

from jattn.toy import mesh as mesh_lib, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
OVERRIDES = [
    f"--config={ROOT / 'configs' / 'tiny.py'}",
    "--config.num_train_steps=12",
    "--config.checkpoint_every_steps=5",
    "--config.log_every_steps=1",
    "--config.eval_every_steps=100",
    "--config.num_eval_sequences=8",
    "--config.num_samples_to_print=1",
    "--config.check_grads=False",
]


def _train(workdir, kill_after=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    if kill_after is not None:
        env["JATTN_TOY_SIGKILL_AFTER_STEP"] = str(kill_after)
    return subprocess.run(
        [sys.executable, str(ROOT / "train_toy.py"), f"--workdir={workdir}", *OVERRIDES],
        capture_output=True, text=True, env=env, timeout=240,
    )


def _rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _uninterrupted_losses():
    """Loss of each of the 12 steps, trained in this process with the trainer's own steps."""
    config = runpy.run_path(str(ROOT / "configs" / "tiny.py"))["get_config"]()
    config.num_train_steps = 12
    mesh = mesh_lib.make_mesh(config.mesh, config.batch_size)
    graphdef, state = train.create_train_state(config, mesh)
    steps = train.jit_steps(config, graphdef, mesh)
    losses = []
    for step in range(config.num_train_steps):
        state, metrics = steps.train_step(state, steps.train_batch(step))
        losses.append(float(metrics["loss"]))
    return losses


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    killed = tmp_path / "killed"
    first = _train(killed, kill_after=8)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    assert not (killed / "summary.json").exists()
    assert [r["step"] for r in _rows(killed)] == list(range(1, 9))
    ckpts = killed / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["5"]
    # What a save killed midway would leave, and a step directory orbax never finished.
    (ckpts / "10.orbax-checkpoint-tmp-1234" / "default").mkdir(parents=True)
    (ckpts / "10.orbax-checkpoint-tmp-1234" / "default" / "garbage").write_text("partial")
    (ckpts / "11" / "default").mkdir(parents=True)

    second = _train(killed)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from checkpoint at step 5" in second.stdout
    assert "discarded incomplete checkpoint" in second.stdout

    expected = _uninterrupted_losses()
    resumed = json.loads((killed / "summary.json").read_text())
    assert resumed["resumed_from_step"] == 5
    assert abs(resumed["final_loss"] - expected[-1]) <= 1e-6, (resumed["final_loss"], expected[-1])
    # the whole loss curve is reproduced, and no step is logged twice
    rows = _rows(killed)
    assert [r["step"] for r in rows] == list(range(1, 13))
    np.testing.assert_allclose([r["loss"] for r in rows], expected, rtol=0, atol=1e-6)
    assert sorted(p.name for p in ckpts.iterdir()) == ["10", "12"]
