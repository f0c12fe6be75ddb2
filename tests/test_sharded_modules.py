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
    for kind in ("nnx", "linen"):
        got = r[kind]
        assert got["max_err"] < 1e-5, (kind, got)
        assert got["out_spec"][:1] == ["data"], (kind, got)  # batch stays data-parallel
        # Trailing None entries of a spec may be dropped: compare the named prefix.
        assert got["query_kernel_spec"][:2] == [None, "model"], (kind, got)  # heads over 'model'
        assert got["key_bias_spec"][:1] == ["model"], (kind, got)
        assert got["out_kernel_spec"][:1] == ["model"], (kind, got)
    # Tensor parallelism, not gathering: the head-sharded attention output meets the
    # head-sharded out projection, whose contraction over heads is an all-reduce.
    assert r["nnx"]["collectives"]["all-reduce"] >= 1 and r["nnx"]["collectives"]["all-gather"] == 0, r["nnx"]
