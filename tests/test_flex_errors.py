"""flex_attention: bad mods and bad inputs give TypeError/ValueError naming the culprit, before XLA."""

import jax
import jax.numpy as jnp
import pytest

import jattn
from jattn.flex import mods

Q = jnp.zeros((2, 6, 4, 8))
KV = jnp.zeros((2, 5, 2, 8))


def _call(**kw):
    return jattn.flex_attention(Q, KV, KV, **kw)


def _branchy_mask(b, h, q_idx, kv_idx):
    if q_idx > kv_idx:  # Python control flow on a traced value
        return True
    return False


def _while_score(score, b, h, q_idx, kv_idx):
    return score * int(kv_idx)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(mask_mod=lambda b, h, q: q > 0), TypeError, "mask_mod: expected a function of 4 positional"),
    (dict(score_mod=lambda s, b, h, q: s), TypeError, "score_mod: expected a function of 5 positional"),
    (dict(mask_mod=lambda b, h, q, kv: q - kv), TypeError, "mask_mod '<lambda>': expected a bool output"),
    (dict(score_mod=lambda s, b, h, q, kv: q > kv), TypeError, "score_mod '<lambda>': expected a floating"),
    (dict(score_mod=lambda s, b, h, q, kv: jnp.stack([s, s])), ValueError,
     "score_mod '<lambda>': expected a scalar output"),
    (dict(mask_mod=lambda b, h, q, kv: jnp.ones((3,), bool)), ValueError, "mask_mod '<lambda>': expected a scalar"),
    (dict(mask_mod=_branchy_mask), TypeError, "mask_mod '_branchy_mask': Python control flow"),
    (dict(score_mod=_while_score), TypeError, "score_mod '_while_score': Python control flow"),
    (dict(mask_mod="causal"), TypeError, "mask_mod: expected a function"),
    (dict(score_mod=lambda s, b, h, q, kv: s + undefined_name), NameError, "undefined_name"),  # noqa: F821
    (dict(implementation="cudnn"), ValueError, "implementation: expected one of"),
    (dict(scale=jnp.ones(2)), TypeError, "scale"),
])
def test_bad_mods_and_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        _call(**kw)


def test_bad_mod_error_under_jit_and_in_create_block_mask():
    with pytest.raises(TypeError, match="mask_mod '_branchy_mask': Python control flow"):
        jax.jit(lambda q: jattn.flex_attention(q, KV, KV, mask_mod=_branchy_mask))(Q)
    with pytest.raises(TypeError, match="mask_mod '<lambda>': expected a bool"):
        jattn.create_block_mask(lambda b, h, q, kv: kv - q, None, None, 6, 5)


@pytest.mark.parametrize("q,k,v,exc,match", [
    (jnp.zeros((6, 8)), KV, KV, ValueError, "query: expected rank"),
    (Q, jnp.zeros((2, 5, 2, 7)), KV, ValueError, "key: expected shape"),
    (Q, KV, jnp.zeros((2, 4, 2, 8)), ValueError, "value: expected shape"),
    (Q, jnp.zeros((2, 5, 3, 8)), jnp.zeros((2, 5, 3, 8)), ValueError, "multiple of the kv heads"),
    (Q.astype(jnp.int32), KV, KV, TypeError, "query: expected a floating"),
    (Q, KV.astype(jnp.bfloat16), KV, TypeError, "expected one dtype"),
])
def test_bad_inputs(q, k, v, exc, match):
    with pytest.raises(exc, match=match):
        jattn.flex_attention(q, k, v, mask_mod=mods.causal)


def test_mod_factories_check_their_arrays():
    with pytest.raises(ValueError, match="document"):
        mods.document(jnp.zeros((2, 3, 4), jnp.int32))
    with pytest.raises(ValueError, match="prefix_lm"):
        mods.prefix_lm(jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="lengths"):
        mods.lengths(jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="relative_bias"):
        mods.relative_bias(jnp.zeros((3,)), 2)
    with pytest.raises(ValueError, match="t5_bias"):
        mods.t5_bias(jnp.zeros((3,)))
