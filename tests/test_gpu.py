"""The GPU path on a real NVIDIA GPU (marker ``gpu``; ``benchmarks/gpu_check.sh`` runs them).

On a machine without one every test here skips with that reason; the dispatch logic itself
is covered on CPU with a faked GPU (tests/test_dispatch.py, tests/test_faults_core.py). With
``JATTN_REQUIRE_GPU=1`` (set by gpu_check.sh) a missing GPU is a failure, not a skip, so the
check can never pass without having run.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import dispatch

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_nvidia_gpu():
    if dispatch.on_nvidia_gpu():
        return
    if os.environ.get("JATTN_REQUIRE_GPU") == "1":
        pytest.fail(f"JATTN_REQUIRE_GPU=1 but the default backend is {jax.default_backend()!r}, "
                    f"devices {jax.devices()}")
    pytest.skip("needs an NVIDIA GPU (cuDNN); run benchmarks/gpu_check.sh on one")


def _inputs(B=2, T=256, S=256, N=4, K=2, H=64, dtype=jnp.bfloat16, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), dtype)
    k = jnp.asarray(rng.standard_normal((B, S, K, H)), dtype)
    v = jnp.asarray(rng.standard_normal((B, S, K, H)), dtype)
    return q, k, v


def _f32(x):
    return np.asarray(jnp.asarray(x, jnp.float32))


@pytest.mark.parametrize("is_causal", [False, True])
def test_auto_runs_cudnn_and_matches_xla(is_causal):
    q, k, v = _inputs()
    assert jattn.explain_implementation(q, k, v, is_causal=is_causal).implementation == "cudnn"
    got = jattn.dot_product_attention(q, k, v, is_causal=is_causal)
    want = jattn.dot_product_attention(q, k, v, is_causal=is_causal, implementation="xla")
    np.testing.assert_allclose(_f32(got), _f32(want), atol=2e-2)
    loss = lambda impl: (lambda q, k, v: jnp.sum(jattn.dot_product_attention(
        q, k, v, is_causal=is_causal, implementation=impl).astype(jnp.float32) ** 2))
    g_cudnn = jax.grad(loss("cudnn"), argnums=(0, 1, 2))(q, k, v)
    g_xla = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_cudnn, g_xla):
        scale = float(np.max(np.abs(_f32(b)))) + 1e-6
        assert float(np.max(np.abs(_f32(a) - _f32(b)))) / scale < 5e-2


def test_bias_is_never_sent_to_cudnn_automatically():
    q, k, v = _inputs()
    bias = jnp.zeros((2, 4, 256, 256), jnp.bfloat16).at[:, :, 3, :].set(-jnp.inf)
    assert jattn.explain_implementation(q, k, v, bias).implementation != "cudnn"
    out = jattn.dot_product_attention(q, k, v, bias)
    assert np.all(_f32(out)[:, 3] == 0) and np.isfinite(_f32(out)).all()


def test_explicit_cudnn_repairs_rows_emptied_by_a_minus_inf_bias():
    q, k, v = _inputs()
    bias = jnp.zeros((2, 4, 256, 256), jnp.bfloat16).at[1, 2, 5, :].set(-jnp.inf)
    out, lse = jattn.dot_product_attention(q, k, v, bias, implementation="cudnn", return_residual=True)
    want, want_lse = jattn.dot_product_attention(q, k, v, bias, implementation="xla", return_residual=True)
    assert np.all(_f32(out)[1, 5, 2] == 0) and _f32(lse)[1, 5, 2] == -np.inf
    np.testing.assert_allclose(_f32(out), _f32(want), atol=2e-2)
    finite = np.isfinite(_f32(want_lse))
    np.testing.assert_allclose(_f32(lse)[finite], _f32(want_lse)[finite], atol=2e-2)
    dq = jax.grad(lambda q: jnp.sum(jattn.dot_product_attention(
        q, k, v, bias, implementation="cudnn").astype(jnp.float32)))(q)
    assert np.isfinite(_f32(dq)).all() and np.all(_f32(dq)[1, 5, 2] == 0)


@pytest.mark.parametrize("impl", ["xla", "chunked", "cudnn"])
def test_nan_propagates_on_the_gpu(impl):
    q, k, v = _inputs()
    q = q.at[0, 7, 1, 0].set(jnp.nan)
    out = jattn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
    nan_rows = np.isnan(_f32(out)).any(-1)
    expected = np.zeros(nan_rows.shape, bool)
    expected[0, 7, 1] = True
    np.testing.assert_array_equal(nan_rows, expected)


def test_chunked_on_gpu_matches_xla_in_float32():
    q, k, v = _inputs(T=384, S=320, dtype=jnp.float32)
    with jax.default_matmul_precision("highest"):
        got = jattn.dot_product_attention(q, k, v, is_causal=True, implementation="chunked",
                                          block_sizes=(128, 128))
        want = jattn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    np.testing.assert_allclose(got, want, atol=2e-5)
