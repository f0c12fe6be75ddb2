"""jattn.nnx / jattn.linen MultiHeadAttention sharded over a 2 (data) x 4 (model, heads) mesh of
8 simulated CPU devices equal the unsharded modules (subprocess: tests/sharded_modules_checks.py)."""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(__file__)


def test_sharded_modules_equal_unsharded():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sharded_modules_checks.py")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    got = r["nnx"]  # specs placed by Flax from the modules' sharding metadata
    assert got["max_err"] < 1e-5, got
    assert got["out_spec"][:1] == ["data"], got  # batch stays data-parallel
    # Trailing None entries of a spec may be dropped: compare the named prefix.
    assert got["query_kernel_spec"][:2] == [None, "model"], got  # heads over 'model'
    assert got["key_bias_spec"][:1] == ["model"], got
    assert got["out_kernel_spec"][:1] == ["model"], got
    got = r["linen"]  # params placed by the check itself: only what the compiler derived is asserted
    assert got["max_err"] < 1e-5 and got["grad_max_err"] < 1e-4, got
    assert got["out_spec"][:1] == ["data"], got
    assert got["grad_query_kernel_spec"][:2] == [None, "model"], got  # gradients stay head-sharded
    assert got["grad_out_kernel_spec"][:1] == ["model"], got
    # Tensor parallelism, not gathering: the head-sharded attention output meets the
    # head-sharded out projection, whose contraction over heads is an all-reduce.
    for kind, key in (("nnx", "collectives"), ("linen", "collectives"), ("linen", "grad_collectives")):
        assert r[kind][key]["all-reduce"] >= 1 and r[kind][key]["all-gather"] == 0, (kind, key, r[kind][key])
