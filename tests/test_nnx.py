"""jattn.nnx.MultiHeadAttention: Flax NNX parameter interop, KV-cache decoding, sow, dropout, errors."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn
from jattn.nnx import MultiHeadAttention

RNG = np.random.default_rng(0)
TOL = dict(rtol=1e-5, atol=1e-5)


def normal(*shape):
    return jnp.asarray(RNG.standard_normal(shape), jnp.float32)


@functools.lru_cache(maxsize=None)
def _jitted(static):
    return nnx.jit(lambda m, *a, **dyn: m(*a, **dict(static), **dyn))


def run(module, *inputs, mask=None, lengths=None, **static):
    """module(*inputs, ...) under nnx.jit: one compile per shape instead of one per eager op."""
    dyn = {k: v for k, v in (("mask", mask), ("lengths", lengths)) if v is not None}
    return _jitted(tuple(sorted(static.items())))(module, *inputs, **dyn)


EXTRAS = ("implementation", "logits_soft_cap", "rope_base")


def pair(num_heads=4, in_features=6, qkv_features=8, num_kv_heads=None, **kw):
    """(flax layer, our layer) with the same (Flax-initialised) parameters."""
    args = dict(num_heads=num_heads, in_features=in_features, qkv_features=qkv_features,
                num_kv_heads=num_kv_heads, **kw)
    flax_args = {k: v for k, v in args.items() if k not in EXTRAS}
    # Initialising under jit compiles once instead of once per initializer (faster tests).
    theirs = nnx.jit(lambda: nnx.MultiHeadAttention(
        **flax_args, decode=False, rngs=nnx.Rngs(0), bias_init=nnx.initializers.normal(0.5)))()
    ours = MultiHeadAttention(**args, rngs=nnx.Rngs(1))
    nnx.update(ours, nnx.state(theirs, nnx.Param))
    return theirs, ours


def flax_full_mask(B, N, T, S, seed):
    """Random [B, N, T, S] bool mask where every query row sees at least one key."""
    m = np.random.default_rng(seed).random((B, N, T, S)) < 0.6
    m[..., 0] = True
    return jnp.asarray(m)


@pytest.mark.parametrize(
    "N, K, F, qkv, B, T",
    [(4, None, 6, 8, 2, 5), (6, 3, 7, 12, 3, 7), (3, 1, 5, 9, 1, 11)],  # MHA, GQA, MQA (odd)
)
def test_flax_params_give_flax_outputs(N, K, F, qkv, B, T):
    theirs, ours = pair(N, F, qkv, K, out_features=5)
    state = nnx.state(ours, nnx.Param)
    assert jax.tree.map(jnp.shape, state) == jax.tree.map(jnp.shape, nnx.state(theirs, nnx.Param))
    assert state["key"]["kernel"].shape == (F, K or N, qkv // N)
    assert state["out"]["kernel"].shape == (N, qkv // N, 5)
    x, y = normal(B, T, F), normal(B, T + 2, F)
    np.testing.assert_allclose(run(ours, x), run(theirs, x), **TOL)
    mask = flax_full_mask(B, N, T, T + 2, seed=T)
    np.testing.assert_allclose(run(ours, x, y, mask=mask), run(theirs, x, y, mask=mask), **TOL)
    float_mask = nnx.make_causal_mask(x[..., 0])  # Flax's float 0/1 mask [B, 1, T, T]
    np.testing.assert_allclose(run(ours, x, mask=float_mask), run(theirs, x, mask=float_mask), **TOL)
    np.testing.assert_allclose(run(ours, x, is_causal=True), run(theirs, x, is_causal=True), **TOL)


def test_our_params_port_to_flax_with_qk_norm_and_extra_batch_dims():
    theirs, _ = pair(normalize_qk=True)
    ours = MultiHeadAttention(4, 6, 8, normalize_qk=True, rngs=nnx.Rngs(5),
                              bias_init=nnx.initializers.normal(0.5))
    nnx.update(theirs, nnx.state(ours, nnx.Param))
    assert "query_ln" in nnx.state(ours, nnx.Param)
    x, y = normal(2, 3, 5, 6), normal(2, 3, 4, 6)  # two batch dims
    np.testing.assert_allclose(run(ours, x, y), run(theirs, x, y), **TOL)


def test_fully_masked_rows_are_zero_before_the_output_projection():
    theirs, ours = pair(use_bias=False)
    x = normal(2, 3, 6)
    mask = jnp.zeros((2, 1, 3, 3), bool).at[:, :, 1:, :].set(True)  # row 0 sees nothing
    out = run(ours, x, mask=mask)
    np.testing.assert_array_equal(out[:, 0], 0.0)  # Flax: mean(value) projected instead
    np.testing.assert_allclose(out[:, 1:], run(theirs, x, mask=mask)[:, 1:], **TOL)


def test_extras_soft_cap_and_rope_against_functional_core():
    _, ours = pair(num_kv_heads=2, logits_soft_cap=3.0, rope_base=100.0, use_bias=False)
    x = normal(2, 5, 6)
    q = jnp.einsum("btf,fnh->btnh", x, ours.query.kernel[...])
    k = jnp.einsum("btf,fnh->btnh", x, ours.key.kernel[...])
    v = jnp.einsum("btf,fnh->btnh", x, ours.value.kernel[...])
    pos = jnp.arange(5)
    q, k = jattn.apply_rope(q, pos, 100.0), jattn.apply_rope(k, pos, 100.0)
    logits = 3.0 * jnp.tanh(jnp.einsum("btnh,bsnh->bnts", q, jnp.repeat(k, 2, axis=2)) * 2**-0.5 / 3.0)
    logits = jnp.where(jnp.tril(jnp.ones((5, 5), bool)), logits, -jnp.inf)
    o = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, -1), jnp.repeat(v, 2, axis=2))
    want = jnp.einsum("btnh,nhf->btf", o, ours.out.kernel[...])
    np.testing.assert_allclose(run(ours, x, is_causal=True), want, **TOL)


# ---------------------------------------------------------------------------------------
# KV-cache decoding
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("N, K, rope", [(4, None, None), (4, 2, 50.0), (4, 1, None)])  # MHA, GQA, MQA
def test_decode_reproduces_full_causal_pass(N, K, rope):
    _, ours = pair(N, 6, 8, K, rope_base=rope)
    x = normal(2, 6, 6)
    full = run(ours, x, is_causal=True)
    ours.init_cache((2, 9, 6))  # room to spare: empty slots must stay invisible
    steps = [run(ours, x[:, t:t + 1], decode=True, is_causal=True) for t in range(6)]
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, **TOL)
    np.testing.assert_array_equal(ours.cache_index[...], [6, 6])
    ours.init_cache((2, 9, 6))
    parts = [run(ours, x[:, :3], decode=True, is_causal=True)]  # prefill, then single steps
    parts += [run(ours, x[:, t:t + 1], decode=True, is_causal=True) for t in range(3, 6)]
    np.testing.assert_allclose(jnp.concatenate(parts, 1), full, **TOL)


def test_decode_is_causal_false_sees_every_valid_slot():
    _, ours = pair()
    x = normal(2, 4, 6)
    ours.init_cache((2, 7, 6))
    run(ours, x[:, :2], decode=True)
    out = run(ours, x[:, 2:], decode=True)  # both new tokens see all 4 written tokens
    np.testing.assert_allclose(out, run(ours, x, is_causal=False)[:, 2:], **TOL)
    ours.init_cache((2, 7, 6))
    run(ours, x[:, :3], decode=True, is_causal=True)
    np.testing.assert_allclose(  # single token: causal and non-causal decode coincide
        run(ours, x[:, 3:], decode=True, is_causal=False), run(ours, x, is_causal=True)[:, 3:], **TOL)


def test_decode_with_is_causal_matches_full_pass_flax_5591(record_property):
    """flax issue 5591: Flax's decode with is_causal=True only sees key 0 after the first step.

    Asserts jattn against the full causal pass; Flax's difference is only reported (as a test
    property and on stdout), so this test keeps passing the day Flax fixes the issue."""
    theirs, ours = pair()
    x = normal(1, 4, 6)
    full = run(theirs, x, is_causal=True)
    theirs.init_cache((1, 4, 6))
    ours.init_cache((1, 4, 6))
    theirs_steps = jnp.concatenate([run(theirs, x[:, t:t + 1], decode=True, is_causal=True) for t in range(4)], 1)
    ours_steps = jnp.concatenate([run(ours, x[:, t:t + 1], decode=True, is_causal=True) for t in range(4)], 1)
    np.testing.assert_allclose(ours_steps, full, **TOL)
    flax_error = float(np.abs(theirs_steps - full).max())
    record_property("flax_5591_max_abs_difference", flax_error)
    print(f"flax issue 5591: Flax's decode differs from the full causal pass by {flax_error:.3g}")


@pytest.mark.parametrize("K", [2, 1])
def test_ragged_right_padded_prompts(K):
    """Rows with prompt lengths 5, 2, 3 (right-padded to 5), then 3 shared single steps."""
    _, ours = pair(4, 6, 8, K, rope_base=10000.0)
    lengths = [5, 2, 3]
    prompts = normal(3, 5, 6)
    new_tokens = normal(3, 3, 6)
    ours.init_cache((3, 8, 6))
    pre = run(ours, prompts, decode=True, is_causal=True, lengths=jnp.array(lengths))
    steps = jnp.concatenate([run(ours, new_tokens[:, t:t + 1], decode=True, is_causal=True) for t in range(3)], 1)
    np.testing.assert_array_equal(ours.cache_index[...], np.array(lengths) + 3)
    # Reference: each row's own sequence (prompt, then new tokens) with no padding in between;
    # trailing filler cannot change earlier outputs of a causal pass.
    seqs = np.zeros((3, 8, 6), np.float32)
    for b, n in enumerate(lengths):
        seqs[b, :n + 3] = np.concatenate([prompts[b, :n], new_tokens[b]])
    full = run(ours, jnp.asarray(seqs), is_causal=True)  # [3, 8, F]
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(pre[b, :n], full[b, :n], **TOL)
        np.testing.assert_allclose(steps[b], full[b, n:n + 3], **TOL)


def test_decode_step_jits_once_and_matches():
    _, ours = pair(4, 6, 8, 2)
    x = normal(2, 6, 6)
    full = run(ours, x, is_causal=True)
    traces = []

    @nnx.jit
    def step(model, tok):
        traces.append(tok.shape)  # runs only while tracing
        return model(tok, decode=True, is_causal=True)

    ours.init_cache((2, 6, 6))
    prefill = step(ours, x[:, :2])
    outs = [step(ours, x[:, t:t + 1]) for t in range(2, 6)]
    assert traces == [(2, 2, 6), (2, 1, 6)]  # one trace for the prefill, one for all steps
    np.testing.assert_allclose(jnp.concatenate([prefill] + outs, 1), full, **TOL)


def test_decode_with_user_mask_and_sow():
    theirs, ours = pair()
    x = normal(2, 3, 6)
    ours.init_cache((2, 5, 6))
    theirs.init_cache((2, 5, 6))
    keep = jnp.array([True, False, True, True, True])[None, None, None, :]  # [1, 1, 1, L]: hide slot 1
    for t in range(3):
        a = ours(x[:, t:t + 1], decode=True, mask=keep, sow_weights=True)
        b = theirs(x[:, t:t + 1], decode=True, mask=keep)
        if t != 1:  # at t=1 Flax attends a row with visible slot 0 only -- same as ours
            np.testing.assert_allclose(a, b, **TOL)
    weights = ours.attention_weights.get_value()
    assert len(weights) == 3 and weights[2].shape == (2, 4, 1, 5)
    np.testing.assert_allclose(weights[2].sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(weights[2][..., 1], 0.0)
    np.testing.assert_array_equal(weights[2][..., 3:], 0.0)


def test_sow_weights_match_flax():
    theirs = nnx.MultiHeadAttention(3, 6, 9, decode=False, rngs=nnx.Rngs(0))
    ours = MultiHeadAttention(3, 6, 9, rngs=nnx.Rngs(1))
    nnx.update(ours, nnx.state(theirs, nnx.Param))
    x = normal(2, 4, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Module.sow outside nnx.capture
        ours(x, sow_weights=True, is_causal=True)
        theirs(x, sow_weights=True, is_causal=True)
    (w,) = ours.attention_weights.get_value()
    (w_flax,) = theirs.attention_weights.get_value()
    assert w.shape == (2, 3, 4, 4)
    np.testing.assert_allclose(w, w_flax, **TOL)
    ours(x)
    assert len(ours.attention_weights.get_value()) == 1  # nothing sown without sow_weights


def test_dropout_is_deterministic_under_fixed_rngs():
    def make():
        return MultiHeadAttention(2, 6, 8, dropout_rate=0.5, rngs=nnx.Rngs(params=0, dropout=3))

    a, b, plain = make(), make(), MultiHeadAttention(2, 6, 8, rngs=nnx.Rngs(params=0))
    x = normal(2, 5, 6)
    out_a = a(x, deterministic=False)
    np.testing.assert_array_equal(out_a, b(x, deterministic=False))  # same stored stream
    assert np.abs(a(x, deterministic=False) - out_a).max() > 1e-4  # the stream advances
    np.testing.assert_array_equal(a(x, rngs=nnx.Rngs(dropout=9), deterministic=False),
                                  b(x, rngs=nnx.Rngs(dropout=9), deterministic=False))
    np.testing.assert_allclose(a(x, deterministic=True), plain(x), **TOL)
    with pytest.raises(ValueError, match="deterministic"):
        a(x)
    c = MultiHeadAttention(2, 6, 8, dropout_rate=0.5, deterministic=False, keep_rngs=False, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rngs"):
        c(x)


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


def test_decode_errors():
    _, ours = pair(4, 6, 8, 2)
    x = normal(2, 4, 6)
    with pytest.raises(ValueError, match="init_cache"):
        ours(x[:, :1], decode=True)
    for bad in [(6,), (2, 5, 7), (2, 0, 6), (2, 5.0, 6), "2,5,6"]:
        with pytest.raises(ValueError, match="input_shape"):
            ours.init_cache(bad)
    ours.init_cache((2, 3, 6))
    with pytest.raises(ValueError, match="cannot fit"):
        ours(x, decode=True)  # 4 new tokens, max_length 3: shapes tell at trace time
    with pytest.raises(ValueError, match="cannot fit"):
        nnx.jit(lambda m, t: m(t, decode=True))(ours, x)
    with pytest.raises(ValueError, match="match the cache"):
        ours(normal(3, 1, 6), decode=True)  # batch 3 against a batch-2 cache
    with pytest.raises(ValueError, match="lengths"):
        ours(x[:, :2], decode=True, lengths=jnp.array([1, 2, 2]))
    with pytest.raises(TypeError, match="lengths"):
        ours(x[:, :2], decode=True, lengths=jnp.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="lengths"):
        ours(x[:, :2], decode=True, lengths=jnp.array([1, 3]))
    with pytest.raises(ValueError, match="lengths"):
        ours(x[:, :2], lengths=jnp.array([1, 2]))  # not decoding
    ours(x[:, :2], decode=True)
    with pytest.raises(ValueError, match="writing past the cache"):
        ours(x[:, :2], decode=True)  # 2 + 2 > 3, known eagerly
    np.testing.assert_array_equal(ours.cache_index[...], [2, 2])  # nothing written


def test_constructor_and_input_errors():
    with pytest.raises(ValueError, match="num_kv_heads"):
        MultiHeadAttention(4, 6, 8, num_kv_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="qkv_features"):
        MultiHeadAttention(3, 6, 8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rope_base"):
        MultiHeadAttention(3, 6, 9, rope_base=1e4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dropout_rate"):
        MultiHeadAttention(2, 6, 8, dropout_rate=1.0, rngs=nnx.Rngs(0))
    _, ours = pair()
    with pytest.raises(ValueError, match="inputs_q"):
        ours(normal(2, 3, 5))
    with pytest.raises(ValueError, match="inputs_k"):
        ours(normal(2, 3, 6), inputs_v=normal(2, 3, 6))
    with pytest.raises(ValueError, match="mask"):
        ours(normal(2, 3, 6), mask=jnp.ones((2, 4, 3, 5), bool))


def test_bfloat16_compute_and_cache():
    _, ours = pair(4, 6, 8, 2)
    low = MultiHeadAttention(4, 6, 8, num_kv_heads=2, dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
    nnx.update(low, nnx.state(ours, nnx.Param))
    x = normal(2, 5, 6)
    full = run(low, x, is_causal=True)
    assert full.dtype == jnp.bfloat16
    np.testing.assert_allclose(full.astype(jnp.float32), run(ours, x, is_causal=True), atol=5e-2, rtol=5e-2)
    low.init_cache((2, 5, 6), jnp.bfloat16)
    steps = jnp.concatenate([run(low, x[:, t:t + 1], decode=True, is_causal=True) for t in range(5)], 1)
    assert low.cached_key.dtype == jnp.bfloat16 and steps.dtype == jnp.bfloat16
    np.testing.assert_allclose(steps.astype(jnp.float32), full.astype(jnp.float32), atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------------------------------
# Decode misuse under jit: poisoned rows, never silent
# ---------------------------------------------------------------------------------------


def test_jitted_decode_out_of_range_poisons_the_row_and_keeps_others_exact():
    _, ours = pair(4, 6, 8, 2)
    x = normal(3, 4, 6)
    step = nnx.jit(lambda m, t, n: m(t, decode=True, is_causal=True, lengths=n))
    ours.init_cache((3, 3, 6))
    step(ours, x[:, :2], jnp.array([2, 1, 1]))  # rows hold 2, 1, 1
    before = np.asarray(ours.cached_key[...])
    # row 0: 2 + 2 > max_length 3; row 1: 1 + 2 = 3 fits; row 2: lengths -1 is nonsense
    out = step(ours, x[:, 2:4], jnp.array([2, 2, -1]))
    assert np.isnan(out[0]).all() and np.isnan(out[2]).all()
    np.testing.assert_array_equal(ours.cache_index[...], [-1, 3, -1])
    np.testing.assert_array_equal(ours.cached_key[...][0], before[0])  # nothing written to a poisoned row
    np.testing.assert_array_equal(ours.cached_key[...][2], before[2])
    # the healthy row is exactly what a clean run of that row alone gives
    _, alone = pair(4, 6, 8, 2)
    alone.init_cache((1, 3, 6))
    alone(x[1:2, :2], decode=True, is_causal=True, lengths=jnp.array([1]))
    np.testing.assert_allclose(out[1], alone(x[1:2, 2:4], decode=True, is_causal=True)[0], **TOL)
    # a poisoned row stays poisoned for later in-range calls; eagerly that is an error
    again = step(ours, x[:, :1], jnp.array([0, 0, 1]))
    assert np.isnan(again[0]).all() and np.isnan(again[2]).all()
    with pytest.raises(ValueError, match="cache_index"):
        ours(x[:, :1], decode=True, lengths=jnp.array([0, 0, 0]))
    ours.init_cache((3, 3, 6))  # a fresh cache is healthy again
    assert np.isfinite(step(ours, x[:, :2], jnp.array([2, 2, 2]))).all()


def test_jitted_decode_lengths_larger_than_new_tokens_is_poisoned():
    _, ours = pair(4, 6, 8, 2)
    ours.init_cache((2, 6, 6))
    out = nnx.jit(lambda m, t, n: m(t, decode=True, lengths=n))(ours, normal(2, 2, 6), jnp.array([3, 2]))
    assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()
    np.testing.assert_array_equal(ours.cache_index[...], [-1, 2])


def test_decode_mask_of_the_wrong_shape_names_mask():
    _, ours = pair(4, 6, 8, 2)
    ours.init_cache((2, 5, 6))
    x = normal(2, 1, 6)
    for bad in [(2, 4, 1, 7), (3, 1, 1, 5), (1, 2, 4, 1, 5)]:  # wrong L, wrong batch, extra rank
        with pytest.raises(ValueError, match=r"mask: expected .*\(2, 4, 1, 5\)"):
            ours(x, decode=True, mask=jnp.ones(bad, bool))
    np.testing.assert_array_equal(ours.cache_index[...], [0, 0])
    ours(x, decode=True, mask=jnp.ones((2, 1, 1, 5), bool))  # broadcastable shapes still work


@pytest.mark.parametrize("bad", [0, -2, True, 2.0])
def test_num_heads_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="num_heads"):
        MultiHeadAttention(bad, 6, 8, rngs=nnx.Rngs(0))
