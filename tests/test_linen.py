"""jattn.linen.MultiHeadAttention: Flax Linen params interop, GQA, KV-cache decoding, sow, dropout, errors."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.linen import MultiHeadAttention

RNG = np.random.default_rng(1)
TOL = dict(rtol=1e-5, atol=1e-5)
KEY = jax.random.key(0)


def normal(*shape):
    return jnp.asarray(RNG.standard_normal(shape), jnp.float32)


@functools.lru_cache(maxsize=None)
def _jitted(model, static, mutable):
    return jax.jit(functools.partial(model.apply, **dict(static), mutable=list(mutable) or False))


def run(model, variables, *inputs, mask=None, lengths=None, mutable=(), **static):
    """model.apply under jax.jit, one compile per (model, static args, shapes)."""
    dyn = {k: v for k, v in (("mask", mask), ("lengths", lengths)) if v is not None}
    return _jitted(model, tuple(sorted(static.items())), tuple(mutable))(variables, *inputs, **dyn)


def flax_params(model, x):
    return jax.jit(model.init)(KEY, x)["params"]


def full_mask(B, N, T, S, seed):
    m = np.random.default_rng(seed).random((B, N, T, S)) < 0.6
    m[..., 0] = True  # every query row sees a key (Flax gives mean(V) otherwise, jattn 0)
    return jnp.asarray(m)


@pytest.mark.parametrize("N, F, qkv, B, T", [(4, 6, 8, 2, 5), (3, 7, 9, 3, 7)])
def test_flax_params_apply_unchanged(N, F, qkv, B, T):
    kw = dict(num_heads=N, qkv_features=qkv, out_features=5, bias_init=nn.initializers.normal(0.5))
    theirs, ours = nn.MultiHeadDotProductAttention(**kw), MultiHeadAttention(**kw)
    x, y = normal(B, T, F), normal(B, T + 2, F)
    params = {"params": flax_params(theirs, x)}
    ours_params = flax_params(ours, x)
    assert jax.tree.map(jnp.shape, ours_params) == jax.tree.map(jnp.shape, params["params"])
    mask = full_mask(B, N, T, T + 2, seed=T)
    np.testing.assert_allclose(ours.apply(params, x, y, mask=mask), theirs.apply(params, x, y, mask=mask), **TOL)
    causal = nn.make_causal_mask(x[..., 0])  # float 0/1 [B, 1, T, T]
    np.testing.assert_allclose(run(ours, params, x, is_causal=True), run(theirs, params, x, mask=causal), **TOL)
    np.testing.assert_allclose(run(ours, params, x, mask=causal), run(theirs, params, x, mask=causal), **TOL)


def test_our_params_to_flax_with_qk_norm_and_batch_dims():
    kw = dict(num_heads=2, qkv_features=8, normalize_qk=True, bias_init=nn.initializers.normal(0.5))
    theirs, ours = nn.MultiHeadDotProductAttention(**kw), MultiHeadAttention(**kw)
    x, y = normal(2, 3, 4, 6), normal(2, 3, 5, 6)
    params = {"params": flax_params(ours, x)}
    assert set(params["params"]) == {"query", "key", "value", "out", "query_ln", "key_ln"}
    np.testing.assert_allclose(run(ours, params, x, y), run(theirs, params, x, y), **TOL)


@pytest.mark.parametrize("N, K", [(6, 3), (4, 1)])
def test_gqa_params_and_against_repeated_heads_mha(N, K):
    """GQA = MHA whose key/value heads are each repeated G = N/K times (head n uses kv head n//G)."""
    ours = MultiHeadAttention(N, qkv_features=2 * N, num_kv_heads=K, bias_init=nn.initializers.normal(0.5))
    x = normal(2, 5, 7)
    p = flax_params(ours, x)
    assert p["query"]["kernel"].shape == (7, N, 2) and p["key"]["kernel"].shape == (7, K, 2)
    assert p["value"]["bias"].shape == (K, 2) and p["out"]["kernel"].shape == (N, 2, 7)
    G = N // K
    rep = dict(p)
    for name in ("key", "value"):
        rep[name] = {"kernel": jnp.repeat(p[name]["kernel"], G, axis=1), "bias": jnp.repeat(p[name]["bias"], G, axis=0)}
    theirs = nn.MultiHeadDotProductAttention(N, qkv_features=2 * N)
    mask = full_mask(2, N, 5, 5, seed=N)
    np.testing.assert_allclose(
        run(ours, {"params": p}, x, mask=mask), run(theirs, {"params": rep}, x, mask=mask), **TOL)


# ---------------------------------------------------------------------------------------
# KV-cache decoding
# ---------------------------------------------------------------------------------------


def decode_setup(N, K, B, L, F=6, rope=None):
    model = MultiHeadAttention(N, qkv_features=8, num_kv_heads=K, rope_base=rope, decode=True,
                               bias_init=nn.initializers.normal(0.5))
    variables = jax.jit(model.init)(KEY, jnp.zeros((B, L, F)))  # Flax's pattern: init allocates the cache
    assert variables["cache"]["cached_key"].shape == (B, L, K or N, 8 // N)
    np.testing.assert_array_equal(variables["cache"]["cache_index"], np.zeros(B))
    return model, variables["params"], variables["cache"]


def decode(model, params, cache, tokens, **kw):
    out, new = run(model, {"params": params, "cache": cache}, tokens, mutable=("cache",), **kw)
    return out, new["cache"]


@pytest.mark.parametrize("N, K, rope", [(4, None, None), (4, 2, 1e4), (4, 1, None)])  # MHA, GQA, MQA
def test_decode_reproduces_full_causal_pass(N, K, rope):
    model, params, cache0 = decode_setup(N, K, B=2, L=8, rope=rope)
    x = normal(2, 6, 6)
    full = run(model, {"params": params}, x, decode=False, is_causal=True)
    cache, outs = cache0, []
    for t in range(6):
        out, cache = decode(model, params, cache, x[:, t:t + 1], is_causal=True)
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, **TOL)
    np.testing.assert_array_equal(cache["cache_index"], [6, 6])
    out, cache = decode(model, params, cache0, x[:, :4], is_causal=True)  # prefill + steps
    outs = [out]
    for t in range(4, 6):
        out, cache = decode(model, params, cache, x[:, t:t + 1], is_causal=True)
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, **TOL)


def test_single_token_decode_matches_flax_decode():
    kw = dict(num_heads=2, qkv_features=8, decode=True, bias_init=nn.initializers.normal(0.5))
    theirs, ours = nn.MultiHeadDotProductAttention(**kw), MultiHeadAttention(**kw)
    x = normal(2, 4, 6)
    v = jax.jit(theirs.init)(KEY, jnp.zeros((2, 5, 6)))
    ours_cache = jax.jit(ours.init)(KEY, jnp.zeros((2, 5, 6)))["cache"]
    theirs_cache = v["cache"]
    for t in range(4):
        a, ours_cache = decode(ours, v["params"], ours_cache, x[:, t:t + 1])
        b, new = run(theirs, {"params": v["params"], "cache": theirs_cache}, x[:, t:t + 1], mutable=("cache",))
        theirs_cache = new["cache"]
        np.testing.assert_allclose(a, b, **TOL)


def test_init_cache_method_and_ragged_batch():
    model = MultiHeadAttention(4, qkv_features=8, num_kv_heads=2, decode=True)
    params = flax_params(model.clone(decode=False), jnp.zeros((3, 1, 6)))
    cache = model.init(KEY, (3, 8, 6), jnp.float32, method=model.init_cache)["cache"]
    assert cache["cached_value"].shape == (3, 8, 2, 2) and cache["cache_index"].shape == (3,)
    lengths = [4, 1, 3]
    prompts, new_tokens = normal(3, 4, 6), normal(3, 2, 6)
    pre, cache = decode(model, params, cache, prompts, is_causal=True, lengths=jnp.array(lengths))
    steps = []
    for t in range(2):
        out, cache = decode(model, params, cache, new_tokens[:, t:t + 1], is_causal=True)
        steps.append(out)
    steps = jnp.concatenate(steps, 1)
    np.testing.assert_array_equal(cache["cache_index"], np.array(lengths) + 2)
    seqs = np.zeros((3, 6, 6), np.float32)  # each row's real tokens, then filler (causal: harmless)
    for b, n in enumerate(lengths):
        seqs[b, :n + 2] = np.concatenate([prompts[b, :n], new_tokens[b]])
    full = run(model, {"params": params}, jnp.asarray(seqs), decode=False, is_causal=True)
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(pre[b, :n], full[b, :n], **TOL)
        np.testing.assert_allclose(steps[b], full[b, n:n + 2], **TOL)


def test_decode_step_jits_once():
    model, params, cache = decode_setup(4, 2, B=2, L=5)
    traces = []

    @jax.jit
    def step(cache, tok):
        traces.append(tok.shape)  # runs only while tracing
        out, new = model.apply({"params": params, "cache": cache}, tok, is_causal=True, mutable=["cache"])
        return out, new["cache"]

    x = normal(2, 5, 6)
    outs = []
    for t in range(5):
        out, cache = step(cache, x[:, t:t + 1])
        outs.append(out)
    assert traces == [(2, 1, 6)]
    full = run(model, {"params": params}, x, decode=False, is_causal=True)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, **TOL)


# ---------------------------------------------------------------------------------------
# sow, dropout, errors
# ---------------------------------------------------------------------------------------


def test_sow_weights_match_flax():
    theirs, ours = nn.MultiHeadDotProductAttention(3, qkv_features=9), MultiHeadAttention(3, qkv_features=9)
    x = normal(2, 4, 6)
    params = {"params": flax_params(theirs, x)}
    mask = full_mask(2, 3, 4, 4, seed=2)
    _, ours_i = ours.apply(params, x, mask=mask, sow_weights=True, mutable=["intermediates"])
    _, theirs_i = theirs.apply(params, x, mask=mask, sow_weights=True, mutable=["intermediates"])
    (w,) = ours_i["intermediates"]["attention_weights"]
    assert w.shape == (2, 3, 4, 4)
    np.testing.assert_allclose(w, theirs_i["intermediates"]["attention_weights"][0], **TOL)
    _, nothing = ours.apply(params, x, mutable=["intermediates"])
    assert "intermediates" not in nothing or not nothing["intermediates"]


def test_dropout_deterministic_under_fixed_rngs():
    model = MultiHeadAttention(2, qkv_features=8, dropout_rate=0.5)
    x = normal(2, 5, 6)
    params = {"params": flax_params(model.clone(dropout_rate=0.0), x)}
    plain = MultiHeadAttention(2, qkv_features=8).apply(params, x)
    a = model.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
    np.testing.assert_array_equal(a, model.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(3)}))
    c = model.apply(params, x, deterministic=False, dropout_rng=jax.random.key(5))  # explicit key wins
    np.testing.assert_array_equal(c, model.apply(params, x, deterministic=False, dropout_rng=jax.random.key(5),
                                                 rngs={"dropout": jax.random.key(6)}))
    b = model.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(4)})
    assert np.abs(a - b).max() > 1e-4
    np.testing.assert_allclose(model.apply(params, x, deterministic=True), plain, **TOL)
    with pytest.raises(ValueError, match="deterministic"):
        model.apply(params, x)


def test_errors():
    model = MultiHeadAttention(4, qkv_features=8, num_kv_heads=2, decode=True)
    params = flax_params(model.clone(decode=False), jnp.zeros((2, 1, 6)))
    x = normal(2, 4, 6)
    with pytest.raises(ValueError, match="init_cache"):
        model.apply({"params": params}, x[:, :1], mutable=["cache"])
    for bad in [(6,), (2, 0, 6), (2, 5.0, 6), "2,5,6"]:
        with pytest.raises(ValueError, match="input_shape"):
            model.init(KEY, bad, method=model.init_cache)
    cache = model.init(KEY, (2, 3, 6), method=model.init_cache)["cache"]
    with pytest.raises(ValueError, match="cannot fit"):
        model.apply({"params": params, "cache": cache}, x, mutable=["cache"])
    with pytest.raises(ValueError, match="cannot fit"):  # at trace time under jit too
        jax.jit(lambda c: model.apply({"params": params, "cache": c}, x, mutable=["cache"]))(cache)
    with pytest.raises(ValueError, match="match the cache"):
        model.apply({"params": params, "cache": cache}, normal(3, 1, 6), mutable=["cache"])
    _, new = model.apply({"params": params, "cache": cache}, x[:, :2], mutable=["cache"])
    with pytest.raises(ValueError, match="writing past the cache"):
        model.apply({"params": params, "cache": new["cache"]}, x[:, :2], mutable=["cache"])
    with pytest.raises(ValueError, match="num_kv_heads"):
        MultiHeadAttention(4, num_kv_heads=3).init(KEY, jnp.zeros((1, 2, 8)))
    with pytest.raises(ValueError, match="qkv_features"):
        MultiHeadAttention(3, qkv_features=8).init(KEY, jnp.zeros((1, 2, 6)))
    with pytest.raises(ValueError, match="lengths"):
        MultiHeadAttention(2).init(KEY, jnp.zeros((1, 2, 6)), lengths=jnp.array([1]))


def test_attention_fn_is_called_like_flax_and_defaults_to_jattn():
    import jattn

    calls = []

    def recording(*args, **kwargs):
        calls.append(sorted(kwargs))
        return jattn.flax_attention_fn(*args, **kwargs)

    x = normal(2, 5, 8)
    default, custom = MultiHeadAttention(num_heads=2), MultiHeadAttention(num_heads=2, attention_fn=recording)
    params = flax_params(default, x)
    np.testing.assert_allclose(
        custom.apply({"params": params}, x, is_causal=True), default.apply({"params": params}, x, is_causal=True), **TOL
    )
    assert calls and {"mask", "dropout_rng", "is_causal", "implementation", "logits_soft_cap"} <= set(calls[0])


def test_attention_fn_receives_precision():
    import jax.lax
    import jattn

    seen = []

    def recording(*args, **kwargs):
        seen.append(kwargs.get("precision", "missing"))
        return jattn.flax_attention_fn(*args, **kwargs)

    model = MultiHeadAttention(num_heads=2, precision=jax.lax.Precision.HIGHEST, attention_fn=recording)
    model.init(KEY, normal(1, 3, 4))
    assert seen == [jax.lax.Precision.HIGHEST]


def test_jitted_decode_out_of_range_poisons_the_row():
    model, params, cache = decode_setup(4, 2, B=2, L=3)
    x = normal(2, 2, 6)
    out, cache = decode(model, params, cache, x, lengths=jnp.array([2, 1]))  # rows hold 2, 1
    out, cache = decode(model, params, cache, x, lengths=jnp.array([2, 2]))  # row 0 overflows
    assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()
    np.testing.assert_array_equal(cache["cache_index"], [-1, 3])
    out, _ = decode(model, params, cache, x[:, :1], lengths=jnp.array([0, 0]))
    assert np.isnan(out[0]).all()
    with pytest.raises(ValueError, match="cache_index"):
        model.apply({"params": params, "cache": cache}, x[:, :1], mutable=["cache"])


def test_decode_mask_shape_and_num_heads_are_named():
    model, params, cache = decode_setup(4, 2, B=2, L=3)
    with pytest.raises(ValueError, match="mask"):
        model.apply({"params": params, "cache": cache}, normal(2, 1, 6), mask=jnp.ones((2, 4, 1, 4), bool),
                    mutable=["cache"])
    for bad in (0, -1):
        with pytest.raises(ValueError, match="num_heads"):
            MultiHeadAttention(bad).init(KEY, jnp.zeros((1, 2, 8)))
