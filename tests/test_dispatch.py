"""Which implementation a call runs: automatic choice, cuDNN constraints, explain_implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import dispatch


def _shapes(T, S=None, H=64, Hv=None, dtype=jnp.float32, N=8, K=8):
    S = T if S is None else S
    return (jax.ShapeDtypeStruct((1, T, N, H), dtype), jax.ShapeDtypeStruct((1, S, K, H), dtype),
            jax.ShapeDtypeStruct((1, S, K, Hv or H), dtype))


def test_short_sequences_use_xla_long_ones_chunked():
    short = jattn.explain_implementation(*_shapes(64))
    assert short.implementation == "xla" and "short" in short.reason
    long = jattn.explain_implementation(*_shapes(4096), is_causal=True)
    assert long.implementation == "chunked" and "long" in long.reason
    # The rule is on T * S, at the documented thresholds: lower with a causal mask or window.
    for threshold, kw in ((dispatch.CHUNKED_MIN_TS, dict(is_causal=True)),
                          (dispatch.CHUNKED_MIN_TS, dict(local_window_size=(8, 0))),
                          (dispatch.CHUNKED_MIN_TS_DENSE, {})):
        edge_T = threshold // 64
        assert jattn.explain_implementation(*_shapes(edge_T, 64), **kw).implementation == "chunked", kw
        assert jattn.explain_implementation(*_shapes(edge_T - 1, 64), **kw).implementation == "xla", kw
    assert jattn.explain_implementation(*_shapes(768)).implementation == "xla"
    assert jattn.explain_implementation(*_shapes(768), is_causal=True).implementation == "chunked"


@pytest.mark.parametrize("kwargs,why", [
    (dict(return_weights=True), "return_weights"),
    (dict(dropout_rate=0.1, dropout_rng=jax.random.key(0)), "dropout_rate"),
])
def test_weights_and_dropout_need_xla(kwargs, why):
    choice = jattn.explain_implementation(*_shapes(4096), **kwargs)
    assert choice.implementation == "xla" and why in choice.reason
    forced = jattn.explain_implementation(*_shapes(4096), implementation="chunked", **kwargs)
    assert forced.implementation == "xla"


def test_requested_implementations_are_honoured():
    assert jattn.explain_implementation(*_shapes(4096), implementation="xla") == ("xla", "requested")
    assert jattn.explain_implementation(*_shapes(16), implementation="chunked") == ("chunked", "requested")


def test_unknown_implementation_and_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="implementation: expected None or one of"):
        jattn.explain_implementation(*_shapes(16), implementation="flash")
    q, k, v = _shapes(16)
    with pytest.raises(ValueError, match="key: expected shape"):
        jattn.explain_implementation(q, jax.ShapeDtypeStruct((1, 16, 8, 32), jnp.float32), v)


def test_cudnn_on_cpu_is_a_clear_error():
    with pytest.raises(ValueError, match="'cudnn' cannot run this call: cudnn needs an NVIDIA GPU"):
        jattn.explain_implementation(*_shapes(128, dtype=jnp.bfloat16), implementation="cudnn")
    x = jnp.zeros((1, 8, 2, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        jattn.dot_product_attention(x, x, x, implementation="cudnn")


def test_auto_picks_cudnn_when_every_constraint_holds(fake_gpu):
    choice = jattn.explain_implementation(*_shapes(1024, dtype=jnp.bfloat16), is_causal=True)
    assert choice.implementation == "cudnn"
    assert jattn.explain_implementation(*_shapes(1024, dtype=jnp.float16)).implementation == "cudnn"
    # A bias could hide a whole row with -inf, where cuDNN does not return 0: never automatic.
    with_bias = jattn.explain_implementation(*_shapes(1024, dtype=jnp.float16), bias=jnp.zeros((1, 8, 1024, 1024)))
    assert with_bias.implementation == "chunked" and "-inf bias" in with_bias.reason
    assert jattn.explain_implementation(*_shapes(1024, dtype=jnp.float16), bias=jnp.zeros((1, 8, 1024, 1024)),
                                        implementation="cudnn").implementation == "cudnn"


@pytest.mark.parametrize("shapes,kwargs,problem", [
    (_shapes(1024), {}, "float16 or bfloat16"),
    (_shapes(1024, H=64, Hv=32, dtype=jnp.bfloat16), {}, "value head dim"),
    (_shapes(1024, H=12, dtype=jnp.bfloat16), {}, "multiple of 8"),
    (_shapes(1024, H=256, dtype=jnp.bfloat16), {}, "multiple of 8 up to 128"),
    (_shapes(1024, dtype=jnp.bfloat16), dict(logits_soft_cap=30.0), "logits_soft_cap"),
    (_shapes(1024, dtype=jnp.bfloat16), dict(mask=np.ones((1, 1, 1024, 1024), bool)), "dense mask"),
    (_shapes(1024, dtype=jnp.bfloat16), dict(key_value_seq_lengths=np.array([5], np.int32)), "lengths"),
    (_shapes(1024, dtype=jnp.bfloat16), dict(q_segment_ids=np.zeros((1, 1024), np.int32),
                                             kv_segment_ids=np.zeros((1, 1024), np.int32)), "segment"),
    (_shapes(1024, dtype=jnp.bfloat16), dict(local_window_size=(8, 8)), "is_causal=True"),
    (_shapes(512, 1024, dtype=jnp.bfloat16), dict(is_causal=True, causal_alignment="bottom_right"),
     "top_left"),
])
def test_cudnn_constraints_fall_back_or_raise(fake_gpu, shapes, kwargs, problem):
    auto = jattn.explain_implementation(*shapes, **kwargs)
    assert auto.implementation == "chunked"  # long: the fallback is the memory-linear path
    with pytest.raises(ValueError, match=problem):
        jattn.explain_implementation(*shapes, implementation="cudnn", **kwargs)


def test_cudnn_path_passes_heads_bias_and_residual_through(fake_gpu):
    # No GPU here: the fixture stands jax.nn's cuDNN call in with its XLA path, which checks
    # jattn's plumbing (head split, bias reshape, fp32 residual) against jattn's 'xla' path.
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 7, 6, 8)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.standard_normal((2, 9, 3, 8)), jnp.bfloat16) for _ in range(2))
    bias = jnp.asarray(rng.standard_normal((1, 6, 7, 9)), jnp.bfloat16)
    got, got_lse = jattn.dot_product_attention(q, k, v, bias, is_causal=True, return_residual=True,
                                               implementation="cudnn")  # never automatic with a bias
    want, want_lse = jattn.dot_product_attention(q, k, v, bias, is_causal=True, return_residual=True,
                                                 implementation="xla")
    assert fake_gpu == ["cudnn"]
    assert got.shape == want.shape and got_lse.dtype == jnp.float32
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=3e-2)
    np.testing.assert_allclose(got_lse, want_lse, atol=3e-2)


def test_explain_matches_what_runs():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 5, 2, 4)), jnp.float32)
    assert jattn.explain_implementation(x, x, x, return_weights=True).implementation == "xla"
    out, weights = jattn.dot_product_attention(x, x, x, return_weights=True)
    assert weights.shape == (1, 2, 5, 5)
