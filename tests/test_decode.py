"""jattn.decode_attention against jattn.dot_product_attention (bottom-right causal, per row)
and the float64 NumPy reference, plus its error handling and memory behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn.kernels import decode as decode_lib
from reference import naive_attention


def _inputs(B, Tq, S, N, K, H, Hv=None, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Tq, N, H)).astype(dtype)
    k = rng.standard_normal((B, S, K, H)).astype(dtype)
    v = rng.standard_normal((B, S, K, Hv or H)).astype(dtype)
    return q, k, v


def _reference(q, k, v, lengths, *, window=None, cap=None):
    """float64 NumPy: each row b over its first lengths[b] keys, bottom-right causal."""
    B, Tq, N, _ = q.shape
    out = np.zeros((B, Tq, N, v.shape[-1]))
    for b in range(B):
        L = int(lengths[b])
        if L == 0:
            continue
        o, _, _ = naive_attention(q[b:b + 1], k[b:b + 1, :L], v[b:b + 1, :L], logits_soft_cap=cap,
                                  is_causal=True, offset=L - Tq,
                                  window=None if window is None else (window, window))
        out[b] = o[0]
    return out


# (B, Tq, S, N, K, H): MHA, GQA, MQA; odd sizes; Tq in {1, 4, 16}.
CASES = [
    (3, 1, 13, 6, 2, 5),
    (2, 4, 11, 3, 1, 7),
    (2, 16, 23, 2, 2, 3),
]


@pytest.mark.parametrize("shape", CASES)
@pytest.mark.parametrize("num_splits", [None, 3, 5])  # 3 and 5 do not divide 11, 13 or 23
def test_matches_reference_and_dot_product_attention(shape, num_splits):
    B, Tq, S, N, K, H = shape
    q, k, v = _inputs(B, Tq, S, N, K, H)
    rng = np.random.default_rng(1)
    lengths = np.array(([0, S] + list(rng.integers(1, S, size=B)))[:B], np.int32)
    out = np.asarray(jattn.decode_attention(q, k, v, lengths=lengths, num_splits=num_splits))
    np.testing.assert_allclose(out, _reference(q, k, v, lengths), atol=2e-5, rtol=2e-5)
    for b in range(B):
        L = int(lengths[b])
        if L == 0:
            np.testing.assert_array_equal(out[b], 0.0)
            continue
        ref = jattn.dot_product_attention(q[b], k[b, :L], v[b, :L], is_causal=True,
                                          causal_alignment="bottom_right")
        np.testing.assert_allclose(out[b], np.asarray(ref), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("window", [0, 2, 6])
def test_local_window_and_soft_cap(window):
    B, Tq, S, N, K, H = 3, 4, 19, 4, 2, 6
    q, k, v = _inputs(B, Tq, S, N, K, H, seed=2)
    q = q * 4  # large logits so the cap matters
    lengths = np.array([S, 3, 12], np.int32)
    out = jattn.decode_attention(q, k, v, lengths=lengths, local_window_size=window,
                                 logits_soft_cap=2.5, num_splits=5)
    ref = _reference(q, k, v, lengths, window=window, cap=2.5)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=2e-5)
    other = jattn.dot_product_attention(q[0], k[0], v[0], is_causal=True, causal_alignment="bottom_right",
                                        local_window_size=(window, 0), logits_soft_cap=2.5)
    np.testing.assert_allclose(np.asarray(out[0]), np.asarray(other), atol=2e-5, rtol=2e-5)


def test_window_skips_splits_and_lengths_bound_the_work():
    static = decode_lib.Static(split_size=4, scale=1.0, logits_soft_cap=None, window_left=None)
    lengths = jnp.array([0, 16, 5, 1], jnp.int32)
    first, starts, ends, total = decode_lib.work_list(lengths, 1, static, num_splits=4)
    assert int(total) == 0 + 4 + 2 + 1  # only splits below each row's length
    windowed = static._replace(window_left=3)
    first, _, _, total = decode_lib.work_list(lengths, 1, windowed, num_splits=4)
    # row 1 (length 16, query at 15) needs keys 12..15: split 3 only; row 2 keys 1..4: splits 0, 1
    assert first.tolist() == [0, 3, 0, 0] and int(total) == 1 + 2 + 1


def test_value_head_dim_and_leading_batch_dims():
    q, k, v = _inputs(6, 2, 9, 4, 2, 5, Hv=3, seed=3)
    lengths = np.array([9, 0, 2, 1, 7, 4], np.int32)
    flat = jattn.decode_attention(q, k, v, lengths=lengths, num_splits=2)
    nested = jattn.decode_attention(*(x.reshape((2, 3) + x.shape[1:]) for x in (q, k, v)),
                                    lengths=lengths.reshape(2, 3), num_splits=2)
    assert nested.shape == (2, 3, 2, 4, 3)
    np.testing.assert_array_equal(np.asarray(nested).reshape(flat.shape), np.asarray(flat))
    np.testing.assert_allclose(np.asarray(flat), _reference(q, k, v, lengths), atol=2e-5)
    single = jattn.decode_attention(q[0], k[0], v[0], lengths=np.int32(9))  # no batch dims
    np.testing.assert_allclose(np.asarray(single), np.asarray(flat[0]), atol=1e-6)


def test_bf16_accumulates_in_fp32():
    q, k, v = _inputs(2, 4, 64, 4, 2, 16, seed=4)
    lengths = np.array([64, 37], np.int32)
    qb, kb, vb = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    out = jattn.decode_attention(qb, kb, vb, lengths=lengths, num_splits=3)
    assert out.dtype == jnp.bfloat16
    ref = _reference(*(np.asarray(x.astype(jnp.float32)) for x in (qb, kb, vb)), lengths)
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), ref, atol=2e-2, rtol=2e-2)
    general = jattn.dot_product_attention(qb[0], kb[0], vb[0], is_causal=True, causal_alignment="bottom_right")
    np.testing.assert_allclose(np.asarray(out[0].astype(jnp.float32)),
                               np.asarray(general.astype(jnp.float32)), atol=1e-2)


def test_float64_stays_float64():
    q, k, v = _inputs(2, 3, 10, 2, 1, 4, seed=5, dtype=np.float64)
    lengths = np.array([10, 6], np.int32)
    with jax.enable_x64(True):
        out = jattn.decode_attention(*(jnp.asarray(x) for x in (q, k, v)), lengths=lengths, num_splits=3)
        assert out.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, lengths), atol=1e-12)


def test_nan_propagates_only_from_visible_entries():
    q, k, v = _inputs(3, 1, 12, 2, 1, 4, seed=6)
    k[0, 3] = np.nan  # visible in row 0
    v[1, 2] = np.nan  # visible in row 1
    k[2, 8:], v[2, 8:] = np.nan, np.nan  # past row 2's length: never seen
    out = np.asarray(jattn.decode_attention(q, k, v, lengths=np.array([12, 12, 8], np.int32), num_splits=3))
    assert np.isnan(out[0]).all() and np.isnan(out[1]).all() and np.isfinite(out[2]).all()


def test_short_rows_and_jit_vmap():
    q, k, v = _inputs(3, 4, 8, 2, 2, 3, seed=7)
    lengths = np.array([2, 0, 8], np.int32)  # row 0 shorter than Tq: its first queries see nothing
    out = jattn.decode_attention(q, k, v, lengths=lengths, num_splits=3)
    np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, lengths), atol=2e-5)
    assert np.all(np.asarray(out[0, :2]) == 0)
    jitted = jax.jit(lambda q, k, v, l: jattn.decode_attention(q, k, v, lengths=l, num_splits=3))
    np.testing.assert_allclose(np.asarray(jitted(q, k, v, lengths)), np.asarray(out), atol=1e-6)
    mapped = jax.vmap(lambda q, k, v, l: jattn.decode_attention(q, k, v, lengths=l, num_splits=3))
    np.testing.assert_allclose(np.asarray(mapped(q, k, v, lengths)), np.asarray(out), atol=1e-6)


def test_jit_lengths_out_of_range_give_nan():
    q, k, v = _inputs(2, 1, 6, 2, 1, 4, seed=8)
    f = jax.jit(lambda l: jattn.decode_attention(q, k, v, lengths=l))
    out = np.asarray(f(jnp.array([7, 6], jnp.int32)))
    assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_no_whole_cache_copy(dtype):
    """The compiled step needs a few splits of scratch, not a copy of the cache."""
    B, S, N, K, H = 2, 4096, 8, 2, 64
    shapes = [jax.ShapeDtypeStruct(s, dtype) for s in ((B, 1, N, H), (B, S, K, H), (B, S, K, H))]
    lengths = jax.ShapeDtypeStruct((B,), jnp.int32)
    compiled = jax.jit(lambda q, k, v, l: jattn.decode_attention(q, k, v, lengths=l, num_splits=16)).lower(
        *shapes, lengths).compile()
    cache_bytes = B * S * K * H * jnp.dtype(dtype).itemsize
    assert compiled.memory_analysis().temp_size_in_bytes < cache_bytes / 4


def test_bad_input():
    q, k, v = _inputs(2, 1, 6, 4, 2, 3)
    lengths = np.array([6, 1], np.int32)
    cases = [
        (dict(query=q[0, 0]), ValueError, "query: expected rank"),
        (dict(key_cache=k[:, :, :, :2]), ValueError, "key_cache: expected shape"),
        (dict(value_cache=v[:, :3]), ValueError, "value_cache: expected shape"),
        (dict(key_cache=k[:, :, :1].repeat(3, 2), value_cache=v[:, :, :1].repeat(3, 2)), ValueError,
         "multiple of the kv heads"),
        (dict(value_cache=v.astype(np.float16)), TypeError, "expected one dtype"),
        (dict(query=q.astype(np.int32)), TypeError, "query: expected a floating dtype"),
        (dict(lengths=np.array([7, 1], np.int32)), ValueError, r"lengths: expected values in \[0, 6\]"),
        (dict(lengths=np.array([6.0, 1.0])), TypeError, "lengths: expected an integer dtype"),
        (dict(lengths=np.array([6, 1, 1], np.int32)), ValueError, "lengths: expected shape"),
        (dict(num_splits=0), ValueError, "num_splits: expected a positive int"),
        (dict(local_window_size=-1), ValueError, "local_window_size"),
        (dict(logits_soft_cap=0.0), ValueError, "logits_soft_cap"),
    ]
    for change, err, msg in cases:
        args = dict(query=q, key_cache=k, value_cache=v, lengths=lengths) | change
        with pytest.raises(err, match=msg):
            jattn.decode_attention(args.pop("query"), args.pop("key_cache"), args.pop("value_cache"), **args)


def test_module_decode_fast_path_equals_general_path(monkeypatch):
    """nnx.MultiHeadAttention's plain causal decode steps of up to DECODE_MAX_TOKENS tokens go
    through decode_attention, a longer prefill through the general path; a copy of the default
    attention_fn forces the general masked path. Same outputs, prefills and steps."""
    import functools

    from flax import nnx

    from jattn import _module_core

    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return jattn.decode_attention(*args, **kwargs)

    monkeypatch.setattr(_module_core, "decode_attention", counted)

    from jattn.flax_attention_fn import flax_attention_fn
    from jattn.nnx import MultiHeadAttention

    def make(attention_fn):
        m = MultiHeadAttention(4, 8, num_kv_heads=2, rope_base=100.0, logits_soft_cap=5.0, decode=True,
                               attention_fn=attention_fn, rngs=nnx.Rngs(0))
        m.init_cache((2, L, 8))
        return m

    long = _module_core.DECODE_MAX_TOKENS + 1
    L = long + 9
    fast, general = make(flax_attention_fn), make(functools.partial(flax_attention_fn))
    x = np.random.default_rng(9).standard_normal((2, L, 8)).astype(np.float32)
    # a long prefill (general path), a short prefill, one token, three tokens (split-K path)
    for chunk in (slice(0, long), slice(long, long + 5), slice(long + 5, long + 6), slice(long + 6, L)):
        a = fast(x[:, chunk], is_causal=True)
        b = general(x[:, chunk], is_causal=True)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(fast.cache_index[...]), [L, L])
    assert calls == [(2, 5, 4, 2), (2, 1, 4, 2), (2, 3, 4, 2)], calls  # the short steps, not the prefill
