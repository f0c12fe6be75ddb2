"""Fault behaviour of the attention core (issue 12): NaN is an error signal, never a mask;
float64 accumulates in float64; empty inputs give empty or zero results; clear errors.

Every path is checked the same way: 'xla', 'chunked' (with small blocks, so that a NaN sits
in a later key block than the row's first one) and ring attention (on one device here; the
multi-device ring runs in tests/ring_checks.py). The NaN patterns are compared with jax.nn,
and float64 results with a naive NumPy float64 reference.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jattn
from reference import naive_attention

B, T, S, N, K, H = 2, 5, 7, 4, 2, 3  # odd sizes, GQA
PATHS = {
    "xla": dict(implementation="xla"),
    "chunked": dict(implementation="chunked", block_sizes=(2, 3)),  # 3 query, 3 key blocks
}


def _inputs(seed=0, dtype=np.float32, t=T, s=S):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, t, N, H)).astype(dtype)
    k = rng.standard_normal((B, s, K, H)).astype(dtype)
    v = rng.standard_normal((B, s, K, H)).astype(dtype)
    return q, k, v


def _nan_rows(out):
    """bool [B, T, N]: which output rows hold a NaN."""
    return np.isnan(np.asarray(out)).any(axis=-1)


def _jax_nn(q, k, v, **kw):
    G = N // K
    return jax.nn.dot_product_attention(q, jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2), **kw)


# ----------------------------------------------------------------------------------------
# NaN propagates; only -inf (and masks, lengths, windows, segments) hides an entry.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_all_nan_bias_gives_nan_outputs_and_gradients(path):
    q, k, v = _inputs()
    bias = jnp.full((B, N, T, S), jnp.nan)
    out = jattn.dot_product_attention(q, k, v, bias=bias, **PATHS[path])
    assert np.isnan(np.asarray(out)).all()
    assert np.isnan(np.asarray(_jax_nn(q, k, v, bias=bias))).all()
    loss = lambda q, b: jnp.sum(jattn.dot_product_attention(q, k, v, bias=b, **PATHS[path]))
    dq, db = jax.grad(loss, argnums=(0, 1))(q, bias)
    assert np.isnan(np.asarray(dq)).all() and np.isnan(np.asarray(db)).all()


@pytest.mark.parametrize("path", PATHS)
def test_one_nan_bias_entry_poisons_exactly_its_row(path):
    q, k, v = _inputs(1)
    bias = np.zeros((B, N, T, S), np.float32)
    bias[1, 2, 3, 5] = np.nan  # batch 1, head 2, query 3, key 5 (third key block)
    out = jattn.dot_product_attention(q, k, v, bias=bias, **PATHS[path])
    expected = np.zeros((B, T, N), bool)
    expected[1, 3, 2] = True
    np.testing.assert_array_equal(_nan_rows(out), expected)
    np.testing.assert_array_equal(_nan_rows(_jax_nn(q, k, v, bias=bias)), expected)
    clean = jattn.dot_product_attention(q, k, v, bias=np.nan_to_num(bias), **PATHS[path])
    np.testing.assert_allclose(np.where(expected[..., None], 0, out), np.where(expected[..., None], 0, clean),
                               atol=1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_nan_bias_entry_hidden_by_mask_or_lengths_stays_hidden(path):
    q, k, v = _inputs(2)
    bias = np.zeros((B, N, T, S), np.float32)
    bias[:, :, :, 6] = np.nan  # the last key: hidden by the mask below and by the kv lengths
    mask = np.ones((B, N, T, S), bool)
    mask[..., 6] = False
    clean = jattn.dot_product_attention(q, k[:, :6], v[:, :6], **PATHS[path])
    by_mask = jattn.dot_product_attention(q, k, v, bias=bias, mask=mask, **PATHS[path])
    by_len = jattn.dot_product_attention(q, k, v, bias=bias, key_value_seq_lengths=jnp.array([6, 6]),
                                         **PATHS[path])
    np.testing.assert_allclose(by_mask, clean, atol=1e-6)
    np.testing.assert_allclose(by_len, clean, atol=1e-6)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_nan_query_row_is_nan_and_nothing_else(path, with_bias):
    q, k, v = _inputs(3)
    q[0, 4, 1, 0] = np.nan  # batch 0, query 4 (last, partial block), head 1
    bias = np.zeros((B, N, T, S), np.float32) if with_bias else None
    out = jattn.dot_product_attention(q, k, v, bias=bias, is_causal=True, **PATHS[path])
    expected = np.zeros((B, T, N), bool)
    expected[0, 4, 1] = True
    np.testing.assert_array_equal(_nan_rows(out), expected)
    np.testing.assert_array_equal(_nan_rows(_jax_nn(q, k, v, bias=bias, is_causal=True)), expected)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_nan_key_poisons_the_rows_that_see_it(path, with_bias):
    q, k, v = _inputs(4)
    k[1, 3, 0, 2] = np.nan  # batch 1, key 3 (second key block), kv head 0 = query heads 0, 1
    bias = np.zeros((B, N, T, S), np.float32) if with_bias else None
    out = jattn.dot_product_attention(q, k, v, bias=bias, is_causal=True, **PATHS[path])
    expected = np.zeros((B, T, N), bool)
    expected[1, 3:, :2] = True  # causal: queries 3 and 4 see key 3
    np.testing.assert_array_equal(_nan_rows(out), expected)
    np.testing.assert_array_equal(_nan_rows(_jax_nn(q, k, v, bias=bias, is_causal=True)), expected)


def test_single_head_attention_propagates_nan_bias():
    q, k, v = (x[0, :, 0] for x in _inputs(5))
    bias = np.zeros((T, S), np.float32)
    bias[2, 4] = np.nan
    out, w = jattn.attention(q, k, v, bias=bias, return_weights=True)
    np.testing.assert_array_equal(np.isnan(np.asarray(out)).any(-1), np.arange(T) == 2)
    assert np.isnan(np.asarray(w)[2]).all() and not np.isnan(np.asarray(w)[[0, 1, 3, 4]]).any()


def test_nan_logsumexp_residual_and_weights():
    q, k, v = _inputs(6)
    bias = np.zeros((B, N, T, S), np.float32)
    bias[0, 0, 1, 0] = np.nan
    for path in PATHS:
        _, lse = jattn.dot_product_attention(q, k, v, bias=bias, return_residual=True, **PATHS[path])
        assert np.isnan(np.asarray(lse)[0, 1, 0]) and np.isnan(np.asarray(lse)).sum() == 1, path
    _, w = jattn.dot_product_attention(q, k, v, bias=bias, return_weights=True)
    assert np.isnan(np.asarray(w)[0, 0, 1]).all() and np.isnan(np.asarray(w)).sum() == S


# ----------------------------------------------------------------------------------------
# float64 accumulates in float64 on every path.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_float64_is_accurate_to_float64(path):
    with jax.enable_x64(True):
        q, k, v = _inputs(8, np.float64)
        ref, _, _ = naive_attention(q, k, v, is_causal=True)
        out = jattn.dot_product_attention(q, k, v, is_causal=True, **PATHS[path])
        assert out.dtype == jnp.float64
        assert float(np.max(np.abs(np.asarray(out) - ref))) < 1e-12
        # Gradients against the (float64) 'xla' path.
        loss = lambda impl: (lambda q, k, v: jnp.sum(jnp.sin(jattn.dot_product_attention(
            q, k, v, is_causal=True, **PATHS[impl]))))
        got = jax.grad(loss(path), argnums=(0, 1, 2))(q, k, v)
        want = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
        for g, w in zip(got, want):
            assert g.dtype == jnp.float64 and float(jnp.max(jnp.abs(g - w))) < 1e-12


# ----------------------------------------------------------------------------------------
# Empty inputs.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [*PATHS, "auto"])
def test_no_keys_gives_zeros_and_zero_gradients(path):
    q, k, v = _inputs(9, s=0)
    kw = PATHS.get(path, {})
    out, lse = jattn.dot_product_attention(q, k, v, return_residual=True, **kw)
    assert out.shape == (B, T, N, H)
    np.testing.assert_array_equal(out, 0)
    np.testing.assert_array_equal(lse, -np.inf)
    dq = jax.grad(lambda q: jnp.sum(jattn.dot_product_attention(q, k, v, **kw)))(q)
    np.testing.assert_array_equal(dq, 0)


@pytest.mark.parametrize("path", [*PATHS, "auto"])
@pytest.mark.parametrize("shape", ["T=0", "B=0", "Hv=0", "N=0"])
def test_empty_shapes_give_empty_results(path, shape):
    q, k, v = _inputs(10)
    if shape == "T=0":
        q = q[:, :0]
    elif shape == "B=0":
        q, k, v = q[:0], k[:0], v[:0]
    elif shape == "Hv=0":
        v = v[..., :0]
    else:
        q = q[:, :, :0]
    out = jattn.dot_product_attention(q, k, v, is_causal=True, **PATHS.get(path, {}))
    assert out.shape == q.shape[:-1] + (v.shape[-1],) and out.size == 0


@pytest.mark.parametrize("path", PATHS)
def test_zero_head_dim_scores_are_zero_so_weights_are_uniform(path):
    q, k, v = _inputs(11)
    out = jattn.dot_product_attention(q[..., :0], k[..., :0], v, is_causal=True, **PATHS[path])
    ref, _, _ = naive_attention(q[..., :0], k[..., :0], v, scale=1.0, is_causal=True)
    np.testing.assert_allclose(out, ref, atol=1e-6)  # row t: the mean of v[:t + 1]


def test_single_head_attention_with_no_keys_is_zero():
    q, k, v = (x[0, :, 0] for x in _inputs(12, s=0))
    out, w = jattn.attention(q, k, v, return_weights=True)
    assert out.shape == (T, H) and w.shape == (T, 0)
    np.testing.assert_array_equal(out, 0)


# ----------------------------------------------------------------------------------------
# Ring attention (one device: the multi-device ring is tests/ring_checks.py's job).
# ----------------------------------------------------------------------------------------


def _ring(q, k, v, **kw):
    mesh = jax.make_mesh((1,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))
    spec = P(None, "seq")
    fn = jax.shard_map(lambda q, k, v: jattn.ring_attention(q, k, v, axis_name="seq", **kw),
                       mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)
    return jax.jit(fn)(q, k, v)


def test_ring_propagates_nan_like_the_other_paths():
    q, k, v = _inputs(13, s=T)
    q[0, 1, 3, 0] = np.nan
    k[1, 2, 1, 1] = np.nan  # kv head 1 = query heads 2, 3
    out = _ring(q, k, v, is_causal=True)
    expected = np.zeros((B, T, N), bool)
    expected[0, 1, 3] = True
    expected[1, 2:, 2:] = True
    np.testing.assert_array_equal(_nan_rows(out), expected)
    np.testing.assert_array_equal(_nan_rows(jattn.dot_product_attention(q, k, v, is_causal=True)), expected)


def test_ring_float64_is_accurate_to_float64():
    with jax.enable_x64(True):
        q, k, v = _inputs(14, np.float64, s=T)
        ref, _, _ = naive_attention(q, k, v, is_causal=True)
        out = _ring(q, k, v, is_causal=True)
        assert out.dtype == jnp.float64
        assert float(np.max(np.abs(np.asarray(out) - ref))) < 1e-12
        dq = jax.grad(lambda q: jnp.sum(jnp.sin(_ring(q, k, v, is_causal=True))))(q)
        want = jax.grad(lambda q: jnp.sum(jnp.sin(jattn.dot_product_attention(q, k, v, is_causal=True))))(q)
        assert dq.dtype == jnp.float64 and float(jnp.max(jnp.abs(dq - want))) < 1e-12


def test_ring_zero_head_dim():
    q, k, v = _inputs(15, s=T)
    out = _ring(q[..., :0], k[..., :0], v)
    ref, _, _ = naive_attention(q[..., :0], k[..., :0], v, scale=1.0)
    np.testing.assert_allclose(out, ref, atol=1e-6)


_RING_SCRIPT = r"""
import json, os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
import jattn
jax.config.update("jax_enable_x64", True)
mesh = jax.make_mesh((4,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))
spec = P(None, "seq")
ring = jax.jit(jax.shard_map(lambda q, k, v: jattn.ring_attention(q, k, v, axis_name="seq", is_causal=True),
                             mesh=mesh, in_specs=(spec,) * 3, out_specs=spec))
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, 8, 2, 3)) for _ in range(3))
ref = jattn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
err64 = float(jnp.max(jnp.abs(ring(q, k, v) - ref)))
k[0, 5, 1, 0] = np.nan  # key 5 sits on device 2: rows 5..7 of head 1 see it
nan_rows = np.isnan(np.asarray(ring(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32)))).any(-1)
print(json.dumps(dict(err64=err64, nan_rows=nan_rows[0].tolist())))
"""


def test_multi_device_ring_float64_and_nan():
    proc = subprocess.run([sys.executable, "-c", _RING_SCRIPT], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["err64"] < 1e-12, r
    expected = np.zeros((8, 2), bool)
    expected[5:, 1] = True
    np.testing.assert_array_equal(np.array(r["nan_rows"]), expected)


# ----------------------------------------------------------------------------------------
# The GPU path keeps jattn's semantics (conftest's fake_gpu: jax.nn's cuDNN call runs its XLA path).
# ----------------------------------------------------------------------------------------


def _bf16_inputs(seed, t=16, s=24):
    """bf16 q [2, t, 4, 8], k, v [2, s, 2, 8]: shapes cuDNN takes (head dim 8)."""
    rng = np.random.default_rng(seed)
    shapes = ((2, t, 4, 8), (2, s, 2, 8), (2, s, 2, 8))
    return tuple(jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for shape in shapes)


def test_auto_never_sends_a_bias_to_cudnn(fake_gpu):
    q, k, v = _bf16_inputs(20)
    bias = jnp.zeros((2, 4, 16, 24), jnp.bfloat16).at[0, 1, 3].set(-jnp.inf)
    assert jattn.explain_implementation(q, k, v).implementation == "cudnn"
    choice = jattn.explain_implementation(q, k, v, bias)
    assert choice.implementation == "xla" and "-inf bias" in choice.reason
    fake_gpu.clear()  # explain_implementation traced the cuDNN call above
    out = jattn.dot_product_attention(q, k, v, bias)
    assert fake_gpu == [] and np.all(np.asarray(out, np.float32)[0, 3, 1] == 0)


@pytest.mark.parametrize("kwargs", [{}, dict(is_causal=True), dict(is_causal=True, local_window_size=(3, 0))])
def test_explicit_cudnn_repairs_rows_that_a_minus_inf_bias_empties(fake_gpu, kwargs):
    q, k, v = _bf16_inputs(21)
    bias = np.zeros((2, 4, 16, 24), np.float32)
    bias[0, 1, 3, :] = -np.inf  # every key hidden
    bias[1, 2, 5, :6] = -np.inf  # causal/window: every visible key hidden (rows see keys <= 5)
    bias = jnp.asarray(bias, jnp.bfloat16)
    run = lambda impl: (lambda q, k, v: jattn.dot_product_attention(
        q, k, v, bias, implementation=impl, return_residual=True, **kwargs))
    out, lse = run("cudnn")(q, k, v)
    want, want_lse = run("xla")(q, k, v)
    assert fake_gpu == ["cudnn"]
    out, want = np.asarray(out, np.float32), np.asarray(want, np.float32)
    assert np.all(out[0, 3, 1] == 0) and np.isneginf(np.asarray(lse)[0, 3, 1])
    if kwargs:
        assert np.all(out[1, 5, 2] == 0) and np.isneginf(np.asarray(lse)[1, 5, 2])
    np.testing.assert_allclose(out, want, atol=3e-2)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    loss = lambda impl: (lambda q, k, v: jnp.sum(run(impl)(q, k, v)[0].astype(jnp.float32)))
    for g, w in zip(jax.grad(loss("cudnn"), argnums=(0, 1, 2))(q, k, v),
                    jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g, w, atol=6e-2)


def test_cudnn_is_not_chosen_for_empty_inputs(fake_gpu):
    q, k, v = _bf16_inputs(22, s=0)
    assert jattn.explain_implementation(q, k, v).implementation != "cudnn"
    with pytest.raises(ValueError, match="non-empty"):
        jattn.explain_implementation(q, k, v, implementation="cudnn")
    np.testing.assert_array_equal(np.asarray(jattn.dot_product_attention(q, k, v), np.float32), 0)


# ----------------------------------------------------------------------------------------
# Clear errors (or the right result) for the remaining unclear cases.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", [None, "chunked"])
def test_jvp_through_chunked_says_so_and_suggests_xla(implementation):
    q = jnp.ones((1, 1024, 1, 8))  # T * S = 1024**2: the automatic choice is 'chunked'
    assert jattn.explain_implementation(q, q, q).implementation == "chunked"
    f = lambda q: jattn.dot_product_attention(q, q, q, implementation=implementation)
    how = "chosen automatically" if implementation is None else "requested"
    with pytest.raises(TypeError, match=rf"'chunked' \({how}.*forward-mode.*implementation='xla'"):
        jax.jvp(f, (q,), (q,))
    small = q[:, :16]
    t_xla = jax.jvp(lambda q: jattn.dot_product_attention(q, q, q, implementation="xla"), (small,), (small,))[1]
    assert np.isfinite(np.asarray(t_xla)).all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("window", [2**31, (2**31, 0), (1, 2**40)])
def test_huge_local_windows_mean_no_bound(path, window):
    q, k, v = _inputs(16)
    got = jattn.dot_product_attention(q, k, v, local_window_size=window, **PATHS[path])
    left, right = (window, window) if isinstance(window, int) else window
    ref, _, _ = naive_attention(q, k, v, window=(min(left, T + S), min(right, T + S)))
    np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("block_sizes", [(True, True), (4, False), (2.0, 2), (0, 4)])
def test_bad_block_sizes_are_value_errors(block_sizes):
    q, k, v = _inputs(17)
    with pytest.raises(ValueError, match=r"block_sizes: expected \(block_q, block_kv\) of positive ints, got"):
        jattn.dot_product_attention(q, k, v, implementation="chunked", block_sizes=block_sizes)
    out = jattn.dot_product_attention(q, k, v, implementation="chunked", block_sizes=(np.int64(2), 3))
    np.testing.assert_allclose(out, jattn.dot_product_attention(q, k, v, implementation="xla"), atol=1e-6)


def test_sequence_parallel_takes_jnp_scalar_scale_and_soft_cap():
    mesh = jax.make_mesh((1,), ("seq",))
    q, k, v = _inputs(18, s=T)
    k, v = k.repeat(2, axis=2), v.repeat(2, axis=2)  # N = K
    got = jattn.sequence_parallel_attention(q, k, v, mesh=mesh, axis_name="seq", scale=jnp.float32(0.5),
                                            logits_soft_cap=jnp.asarray(5.0))
    want = jattn.dot_product_attention(q, k, v, scale=0.5, logits_soft_cap=5.0)
    np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(TypeError, match="scale: expected a static Python number, got a traced array"):
        jax.jit(lambda s: jattn.sequence_parallel_attention(q, k, v, mesh=mesh, axis_name="seq", scale=s))(0.5)


_EXPLICIT_MESH_GRAD = r"""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax, jax.numpy as jnp, numpy as np, jattn
mesh = jax.make_mesh((2,), ("seq",))  # Explicit axes (the default)
q = jnp.asarray(np.random.default_rng(0).standard_normal((1, 8, 2, 4)), jnp.float32)
f = lambda q: jnp.sum(jattn.sequence_parallel_attention(q, q, q, mesh=mesh, axis_name="seq") ** 2)
try:
    jax.grad(f)(q)
    print("eager grad without set_mesh: ran")
except ValueError as e:
    print("eager grad without set_mesh:", "jax.set_mesh" in str(e))
with jax.set_mesh(mesh):
    g1 = jax.grad(f)(q)
g2 = jax.jit(jax.grad(f))(q)
g3 = jax.grad(lambda q: jnp.sum(jattn.dot_product_attention(q, q, q) ** 2))(q)
print("set_mesh / jit match", float(jnp.max(jnp.abs(g1 - g3))) < 1e-4, float(jnp.max(jnp.abs(g2 - g3))) < 1e-4)
"""


def test_readme_explicit_mesh_eager_grad_note_holds():
    """README: eager jax.grad over an Explicit mesh needs jax.set_mesh or jit (checked here)."""
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    assert "Eager `jax.grad` on an Explicit mesh" in readme and "jax.set_mesh(mesh)" in readme
    proc = subprocess.run([sys.executable, "-c", _EXPLICIT_MESH_GRAD], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert "set_mesh / jit match True True" in lines, lines
    # If a future JAX runs it eagerly, the README note can go; until then the error names the fix.
    assert any(line.startswith("eager grad without set_mesh: ") for line in lines), lines
    assert "eager grad without set_mesh: False" not in lines, lines


def test_huge_local_window_on_ring():
    q, k, v = _inputs(19, s=T)
    got = _ring(q, k, v, is_causal=True, local_window_size=(2**31, 2**31))
    np.testing.assert_allclose(got, jattn.dot_product_attention(q, k, v, is_causal=True), atol=1e-5)


# ----------------------------------------------------------------------------------------
# Siblings: a non-finite value, or inf anywhere, and garbage in hidden (padding) positions.
# ----------------------------------------------------------------------------------------

ALL_PATHS = {**PATHS, "chunked_4x3": dict(implementation="chunked", block_sizes=(4, 3))}


def _garbage_in_padding(seed):
    """Inputs with NaN/inf in every position hidden by the lengths, and the clean ones."""
    q, k, v = _inputs(seed)
    q_len, kv_len = np.array([4, 5]), np.array([5, 7])
    dirty = [x.copy() for x in (q, k, v)]
    dirty[0][0, 4] = np.nan  # query row 4 of batch 0 is past its length
    dirty[1][0, 5:] = np.inf  # keys 5, 6 of batch 0 are past its length
    dirty[2][0, 5] = np.nan
    dirty[2][0, 6] = -np.inf
    return (q, k, v), tuple(dirty), dict(query_seq_lengths=q_len, key_value_seq_lengths=kv_len)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_garbage_hidden_by_lengths_changes_nothing(path):
    clean, dirty, lengths = _garbage_in_padding(30)
    f = lambda q, k, v: jattn.dot_product_attention(q, k, v, **lengths, **ALL_PATHS[path])
    np.testing.assert_array_equal(f(*dirty), f(*clean))
    loss = lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
    for d, c in zip(jax.grad(loss, argnums=(0, 1, 2))(*dirty), jax.grad(loss, argnums=(0, 1, 2))(*clean)):
        d, c = np.asarray(d), np.asarray(c)
        assert np.isfinite(d).all()
        # Hidden rows get zero gradients; elsewhere the gradients are the clean ones.
        np.testing.assert_allclose(d, c, atol=1e-6)


def test_garbage_hidden_by_lengths_changes_nothing_on_ring():
    clean, dirty, lengths = _garbage_in_padding(31)
    clean, dirty = ([x[:, :T] for x in xs] for xs in (clean, dirty))  # ring: S = T
    lengths["key_value_seq_lengths"] = np.array([3, 5])
    dirty[1][0, 3:], dirty[2][0, 3:] = np.nan, np.inf
    np.testing.assert_array_equal(_ring(*dirty, **lengths), _ring(*clean, **lengths))
    dq = jax.grad(lambda k: jnp.sum(_ring(dirty[0], k, dirty[2], **lengths)))(dirty[1])
    assert np.isfinite(np.asarray(dq)).all()


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_value_poisons_exactly_the_rows_that_see_it(path, bad):
    q, k, v = _inputs(32)
    v[1, 4, 1, 2] = bad  # batch 1, key 4, kv head 1 (query heads 2, 3)
    out = jattn.dot_product_attention(q, k, v, is_causal=True, **ALL_PATHS[path])
    expected = np.zeros((B, T, N), bool)
    expected[1, 4:, 2:] = True  # causal: only query 4 sees key 4
    np.testing.assert_array_equal(_nan_rows(out), expected)
    clean = jattn.dot_product_attention(q, k, np.nan_to_num(v, posinf=0.0), is_causal=True, **ALL_PATHS[path])
    np.testing.assert_allclose(np.where(expected[..., None], 0, out), np.where(expected[..., None], 0, clean),
                               atol=1e-6)


def test_non_finite_value_on_ring_and_modules():
    q, k, v = _inputs(33, s=T)
    v[0, 2, 0, 1] = np.nan
    expected = np.zeros((B, T, N), bool)
    expected[0, 2:, :2] = True
    np.testing.assert_array_equal(_nan_rows(_ring(q, k, v, is_causal=True)), expected)
    from flax import nnx

    x = np.random.default_rng(7).standard_normal((2, 9, 6)).astype(np.float32)
    x[1, 4, 0] = np.nan  # one token: its query, key and value are NaN
    outs = {}
    for impl in ("xla", "chunked"):
        m = jattn.nnx.MultiHeadAttention(num_heads=2, in_features=6, qkv_features=8, decode=False,
                                         implementation=impl, rngs=nnx.Rngs(0))
        outs[impl] = np.asarray(m(x, mask=jnp.tril(jnp.ones((9, 9), bool))))
    expected = np.zeros((2, 9), bool)
    expected[1, 4:] = True  # causal: tokens before the NaN token never see it
    for impl, out in outs.items():
        np.testing.assert_array_equal(np.isnan(out).any(-1), expected, err_msg=impl)
    np.testing.assert_allclose(outs["chunked"], outs["xla"], atol=1e-5)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_infinite_query_or_key_is_nan_not_masked(path):
    q, k, v = _inputs(34)
    q[0, 1, 0] = -np.inf  # every score of that row is +-inf: it used to look like a masked row (0)
    k[1, 2, 1, 0] = np.inf
    mask = np.ones((B, N, T, S), bool)
    out = jattn.dot_product_attention(q, k, v, mask=mask, logits_soft_cap=5.0, **ALL_PATHS[path])
    expected = np.zeros((B, T, N), bool)
    expected[0, 1, 0] = True
    expected[1, :, 2:] = True  # every query sees key 2; the soft cap must not bound the inf
    np.testing.assert_array_equal(_nan_rows(out), expected)


@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
def test_non_finite_value_with_a_causal_offset_poisons_the_rows_that_see_it(alignment):
    """The causal-only 'xla' path finds those rows from a running max over the keys."""
    q, k, v = _inputs(35)  # T = 5 queries, S = 7 keys
    v[0, 3, 1, 0] = np.nan  # batch 0, key 3, kv head 1 (query heads 2, 3)
    offset = S - T if alignment == "bottom_right" else 0  # query t sits at key position t + offset
    out = jattn.dot_product_attention(q, k, v, is_causal=True, causal_alignment=alignment, implementation="xla")
    expected = np.zeros((B, T, N), bool)
    expected[0, max(0, 3 - offset):, 2:] = True
    np.testing.assert_array_equal(_nan_rows(out), expected)
    chunked = jattn.dot_product_attention(q, k, v, is_causal=True, causal_alignment=alignment,
                                          implementation="chunked", block_sizes=(2, 3))
    np.testing.assert_array_equal(_nan_rows(chunked), expected)


# Sizes at which XLA:CPU's max-reduction drops NaN (jax 0.10.2: from 16 rows on); the NaN
# flags must be combined by sums. Causal, so a bad key poisons exactly the rows at or after it.
@pytest.mark.parametrize("where", ["query", "key", "value"])
@pytest.mark.parametrize("fn", ["xla", "chunked", "flex", "ring"])
def test_nan_row_is_seen_at_sizes_where_max_reductions_drop_nan(where, fn):
    t, n, h, bad_row, bad_head = 64, 2, 64, 37, 1
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((1, t, n, h)).astype(np.float32) for _ in range(3))
    arrays = dict(query=q, key=k, value=v)
    arrays[where][0, bad_row, bad_head, 5] = np.nan
    q, k, v = arrays["query"], arrays["key"], arrays["value"]
    if fn == "flex":
        out = jattn.flex_attention(q, k, v, mask_mod=jattn.flex.mods.causal)
    elif fn == "ring":
        out = _ring(q, k, v, is_causal=True)
    else:
        out = jattn.dot_product_attention(q, k, v, is_causal=True, implementation=fn,
                                          **({"block_sizes": (16, 16)} if fn == "chunked" else {}))
    got = np.isnan(np.asarray(out)).any(-1)[0]  # [T, N]
    want = np.zeros((t, n), bool)
    want[bad_row:, bad_head] = True
    if where == "query":
        want[bad_row + 1:, bad_head] = False  # a bad query row poisons only itself
    np.testing.assert_array_equal(got, want)
