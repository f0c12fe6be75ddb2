"""Toy trainer: data parallelism over 8 simulated CPU devices equals the 1-device run.

The subprocess sets ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before jax starts.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, runpy, sys
import jax
from jattn.toy import data, mesh as mesh_lib, train

config = runpy.run_path(sys.argv[1])["get_config"]()
config.batch_size = 16
heldout = data.eval_batch(0, num_sequences=16, seq_len=config.seq_len,
                          vocab_size=config.vocab_size, task=config.task)
report = {"device_count": jax.device_count()}

for size in (8, 1):
    config.mesh.data = size
    mesh = mesh_lib.make_mesh(config.mesh, config.batch_size)
    graphdef, state = train.create_train_state(config, mesh)
    steps = train.jit_steps(config, graphdef, mesh)
    losses = []
    for step in range(3):
        batch = steps.train_batch(step)
        state, metrics = steps.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    shards = batch.inputs.addressable_shards
    params = jax.tree.leaves(state.params)
    sharded = jax.device_put(heldout, mesh_lib.batch_sharded(mesh))
    _, outputs = steps.eval_step(state.params, sharded)
    report[size] = {
        "losses": losses,
        "batch_shard_rows": sorted({s.data.shape[0] for s in shards}),
        "batch_devices": len({s.device for s in shards}),
        "params_replicated": all(p.sharding.is_fully_replicated for p in params),
        "params_devices": len(params[0].sharding.device_set),
        "outputs": outputs.tolist(),
    }

config.mesh.data = -1
config.batch_size = 12
try:
    mesh_lib.make_mesh(config.mesh, config.batch_size)
except ValueError as e:
    report["error"] = str(e)
print("REPORT", json.dumps(report))
"""


def test_data_parallel_on_8_simulated_devices(tmp_path):
    script = tmp_path / "dp.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(script), str(ROOT / "configs" / "tiny.py")],
                          capture_output=True, text=True, env=env, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.split("REPORT ", 1)[1])
    assert report["device_count"] == 8
    dp, single = report["8"], report["1"]
    assert dp["batch_devices"] == 8 and dp["batch_shard_rows"] == [2]  # 16 rows / 8 devices
    assert single["batch_devices"] == 1 and single["batch_shard_rows"] == [16]
    assert dp["params_replicated"] and dp["params_devices"] == 8
    np.testing.assert_allclose(dp["losses"], single["losses"], rtol=1e-5)
    assert dp["losses"][2] < dp["losses"][0]
    assert dp["outputs"] == single["outputs"]
    assert report["error"] == "config.batch_size: expected a multiple of the data axis size 8, got 12"
