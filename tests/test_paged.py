"""jattn.kernels.paged: the paged KV cache against dense decode_attention, page bookkeeping, misuse."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn.kernels import paged


def _inputs(B, Tq, S, N, K, H, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Tq, N, H)).astype(np.float32)
    k = rng.standard_normal((B, S, K, H)).astype(np.float32)
    v = rng.standard_normal((B, S, K, H)).astype(np.float32)
    return q, k, v


@pytest.mark.parametrize("page_size,Tq,window", [(4, 1, None), (5, 4, None), (3, 2, 4)])
def test_paged_equals_contiguous(page_size, Tq, window):
    B, S, N, K, H = 4, 17, 6, 2, 5
    q, k, v = _inputs(B, Tq, S, N, K, H)
    lengths = np.array([S, 0, 9, 2], np.int32)
    cache = paged.from_dense(k, v, lengths, page_size=page_size, num_pages=30)
    got = paged.paged_decode_attention(q, cache, local_window_size=window, logits_soft_cap=3.0)
    want = jattn.decode_attention(q, k, v, lengths=lengths, local_window_size=window, logits_soft_cap=3.0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)


def test_incremental_appends_match_dense_and_free_reuses_pages():
    B, S, N, K, H = 3, 12, 4, 2, 3
    q, k, v = _inputs(B, 1, S, N, K, H, seed=1)
    cache = paged.init(9, 4, K, H, batch_size=B, max_pages_per_sequence=3)
    # Ragged prefill chunk, then single decode tokens.
    prefill = np.array([5, 0, 7], np.int32)
    cache = paged.append(paged.allocate(cache, prefill), k[:, :7], v[:, :7], prefill)
    written = prefill.copy()
    for _ in range(4):
        step = np.array([1, 1, 1], np.int32)
        cache = paged.allocate(cache, step)
        idx = written  # row b's next token is its token `written[b]`
        cache = paged.append(cache, k[np.arange(B), idx][:, None], v[np.arange(B), idx][:, None], step)
        written = written + 1
    np.testing.assert_array_equal(np.asarray(cache.lengths), written)
    dense_k = np.stack([np.concatenate([k[b, :written[b]], np.zeros((S - written[b], K, H), np.float32)]) for b in range(B)])
    dense_v = np.stack([np.concatenate([v[b, :written[b]], np.zeros((S - written[b], K, H), np.float32)]) for b in range(B)])
    want = jattn.decode_attention(q, dense_k, dense_v, lengths=written)
    np.testing.assert_allclose(np.asarray(paged.paged_decode_attention(q, cache)), np.asarray(want), atol=2e-6)
    # Freeing row 0 returns its pages; a new sequence in that slot does not disturb the others.
    before = np.asarray(paged.paged_decode_attention(q, cache))
    cache = paged.free(cache, np.array([True, False, False]))
    assert int(cache.page_free.sum()) == 9 - 1 - 3  # rows 1, 2 hold 4 and 11 tokens: 1 and 3 pages
    cache = paged.allocate(cache, np.array([8, 0, 0], np.int32))
    cache = paged.append(cache, k[:, ::-1][:, :8], v[:, ::-1][:, :8], np.array([8, 0, 0], np.int32))
    after = np.asarray(paged.paged_decode_attention(q, cache))
    np.testing.assert_array_equal(after[1:], before[1:])
    want0 = jattn.decode_attention(q[:1], np.ascontiguousarray(k[:1, ::-1][:, :8]),
                                   np.ascontiguousarray(v[:1, ::-1][:, :8]), lengths=np.array([8], np.int32))
    np.testing.assert_allclose(after[:1], np.asarray(want0), atol=2e-6)
    paged.check(cache)


def test_bf16_pages():
    q, k, v = _inputs(2, 2, 10, 4, 2, 8, seed=2)
    qb, kb, vb = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    lengths = np.array([10, 6], np.int32)
    cache = paged.from_dense(kb, vb, lengths, page_size=4)
    got = paged.paged_decode_attention(qb, cache)
    want = jattn.decode_attention(qb, kb, vb, lengths=lengths, num_splits=3)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=1e-2)


def test_eager_errors():
    q, k, v = _inputs(2, 1, 8, 2, 1, 3)
    cache = paged.init(3, 4, 1, 3, batch_size=2, max_pages_per_sequence=2)
    with pytest.raises(ValueError, match="out of pages: need 4 more pages, 3 of 3 are free"):
        paged.allocate(cache, np.array([8, 8], np.int32))
    with pytest.raises(ValueError, match="max_pages_per_sequence is 2"):
        paged.allocate(cache, np.array([9, 0], np.int32))
    cache = paged.allocate(cache, np.array([5, 2], np.int32))
    with pytest.raises(ValueError, match="writing past the sequences' pages"):
        paged.append(cache, k[:, :5], v[:, :5], np.array([5, 5], np.int32))  # row 1 holds 4 slots
    with pytest.raises(ValueError, match=r"num_new: expected values in \[0, 3\]"):
        paged.append(cache, k[:, :3], v[:, :3], np.array([4, 0], np.int32))
    with pytest.raises(ValueError, match="key: expected shape"):
        paged.append(cache, k[:, :3, :, :2], v[:, :3], np.array([1, 1], np.int32))
    with pytest.raises(TypeError, match="rows: expected dtype bool"):
        paged.free(cache, np.array([1, 0]))
    with pytest.raises(ValueError, match="query: expected shape"):
        paged.paged_decode_attention(q[:1], cache)
    with pytest.raises(ValueError, match="page_size: expected a positive int"):
        paged.init(3, 0, 1, 3, batch_size=2, max_pages_per_sequence=2)
    shared = cache._replace(page_table=cache.page_table.at[1, 0].set(cache.page_table[0, 0]))
    with pytest.raises(ValueError, match="bad page table"):
        paged.paged_decode_attention(q, shared)
    outside = cache._replace(page_table=cache.page_table.at[1, 0].set(7))
    with pytest.raises(ValueError, match="bad page table"):
        paged.append(outside, k[:, :1], v[:, :1])


def test_misuse_under_jit_flags_drops_and_poisons_only_the_offender():
    q, k, v = _inputs(3, 1, 8, 2, 1, 3, seed=3)
    cache = paged.from_dense(k, v, np.array([4, 3, 8], np.int32), page_size=4, num_pages=5,
                             max_pages_per_sequence=2)
    assert int(cache.page_free.sum()) == 1
    step = jax.jit(lambda c, k, v, n: paged.append(paged.allocate(c, n), k, v, n))
    # Row 0 needs a 2nd page (1 free: granted), row 1 fits its page, row 2 wants a 3rd page
    # (past max_pages_per_sequence): flagged, its write dropped.
    new = step(cache, k[:, :1] + 100, v[:, :1] + 100, jnp.array([1, 1, 1], jnp.int32))
    assert np.asarray(new.errors).tolist() == [0, 0, paged.OUT_OF_PAGES | paged.PAST_PAGES]
    assert np.asarray(new.lengths).tolist() == [5, 4, 8]
    row2_pages = np.asarray(cache.page_table[2])
    np.testing.assert_array_equal(np.asarray(new.key_pages)[row2_pages], np.asarray(cache.key_pages)[row2_pages])
    out = np.asarray(jax.jit(paged.paged_decode_attention)(q, new))
    assert np.isfinite(out[:2]).all() and np.isnan(out[2]).all()
    with pytest.raises(ValueError, match="sequences {2:"):
        paged.check(new)
    # Now the pool is empty: row 1 asking for a page under jit is refused, row 0 untouched.
    newer = step(new, k[:, :1], v[:, :1], jnp.array([0, 1, 0], jnp.int32))
    assert int(newer.errors[1]) == paged.OUT_OF_PAGES | paged.PAST_PAGES
    np.testing.assert_array_equal(np.asarray(newer.key_pages), np.asarray(new.key_pages))
    # Freeing the offender clears it and returns its pages.
    freed = paged.free(newer, np.array([False, True, True]))
    paged.check(freed)
    assert int(freed.page_free.sum()) == 3
    np.testing.assert_array_equal(np.asarray(paged.paged_decode_attention(q, freed))[0], out[0])


def test_nnx_module_decodes_with_a_paged_cache():
    """jattn.nnx.MultiHeadAttention over a paged cache equals the same layer over its fixed
    cache: a prefill, then jitted single steps; a misused slot under jit is NaN only there."""
    from flax import nnx

    from jattn.nnx import MultiHeadAttention

    layer = MultiHeadAttention(4, 8, num_kv_heads=2, rope_base=100.0, decode=True, rngs=nnx.Rngs(0))
    x = np.random.default_rng(4).standard_normal((2, 7, 8)).astype(np.float32)
    layer.init_cache((2, 7, 8))
    fixed = [layer(x[:, :4], is_causal=True)] + [layer(x[:, t:t + 1], is_causal=True) for t in range(4, 7)]
    # 7 pages of 2 slots: at the 7th token slot 0 takes the last page, slot 1 runs out (under jit).
    layer.init_paged_cache(7, 2, batch_size=2, max_pages_per_sequence=4)
    step = nnx.jit(lambda m, tok: m(tok, decode=True, is_causal=True))
    paged_out = [layer(x[:, :4], is_causal=True)] + [step(layer, x[:, t:t + 1]) for t in range(4, 7)]
    for a, b in zip(fixed[:-1], paged_out[:-1]):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)
    np.testing.assert_allclose(np.asarray(paged_out[-1][0]), np.asarray(fixed[-1][0]), atol=1e-5)
    assert np.isnan(np.asarray(paged_out[-1][1])).all()
    cache = layer.paged_cache.get_value()
    assert np.asarray(cache.lengths).tolist() == [7, 6] and int(cache.errors[1]) != 0
    with pytest.raises(ValueError, match="sequences {1:"):
        paged.check(cache)
    with pytest.raises(ValueError, match="a paged cache takes plain causal steps"):
        layer(x[:, :1], is_causal=False)


def test_linen_module_decodes_with_a_paged_cache():
    import jax

    from jattn.linen import MultiHeadAttention

    model = MultiHeadAttention(num_heads=4, num_kv_heads=2, rope_base=100.0, decode=True)
    x = np.random.default_rng(5).standard_normal((2, 6, 8)).astype(np.float32)
    params = {"params": model.init(jax.random.key(0), x)["params"]}
    fixed = model.init(jax.random.key(0), (2, 6, 8), method=model.init_cache)["cache"]
    pages = model.init(jax.random.key(0), 8, 6, 2, batch_size=2, max_pages_per_sequence=3,
                       method=model.init_paged_cache)["cache"]
    for chunk in (slice(0, 3), slice(3, 4), slice(4, 6)):
        a, upd = model.apply(params | {"cache": fixed}, x[:, chunk], is_causal=True, mutable=["cache"])
        fixed = upd["cache"]
        b, upd = model.apply(params | {"cache": pages}, x[:, chunk], is_causal=True, mutable=["cache"])
        pages = upd["cache"]
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)
    assert np.asarray(pages["paged_cache"].lengths).tolist() == [6, 6]
