"""flex_attention under faults (issue 12): NaN/inf in q, k, v reach exactly the rows that see
them, identically on 'xla' and 'chunked' (small blocks, so a bad key shares a tile with
rows that must not see it); empty batch, query or key axes give zeros / empty results."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn.flex import mods

B, T, S, N, K, H, HV = 2, 7, 11, 2, 1, 3, 5
PATHS = {"xla": dict(implementation="xla"), "chunked": dict(implementation="chunked")}
BLOCK = (3, 5)  # divides neither T nor S


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, T, N, H)).astype(np.float32),
            rng.standard_normal((B, S, K, H)).astype(np.float32),
            rng.standard_normal((B, S, K, HV)).astype(np.float32))


def _run(path, q, k, v, mask_mod=None, score_mod=None):
    bm = None
    if path == "chunked" and mask_mod is not None:
        bm = jattn.create_block_mask(mask_mod, None, None, T, S, block_size=BLOCK)
        mask_mod = None
    elif path == "chunked":
        bm = jattn.create_block_mask(None, None, None, T, S, block_size=BLOCK)
    return jattn.flex_attention(q, k, v, mask_mod=mask_mod, block_mask=bm, score_mod=score_mod, **PATHS[path])


def _nan_rows(out):
    return np.isnan(np.asarray(out)).any(axis=-1)  # [B, T, N]


CAUSAL = np.arange(S)[None, :] <= np.arange(T)[:, None]  # [T, S]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("where,bad", [("k", np.nan), ("k", np.inf), ("v", np.nan), ("v", -np.inf)])
def test_bad_key_or_value_reaches_only_rows_that_see_it(path, where, bad):
    q, k, v = _inputs()
    (k if where == "k" else v)[1, 4, 0, 1] = bad  # batch 1, key 4: causal rows 4.. see it
    out = _run(path, q, k, v, mask_mod=mods.causal)
    expected = np.zeros((B, T, N), bool)
    expected[1] = CAUSAL[:, 4][:, None]
    np.testing.assert_array_equal(_nan_rows(out), expected)
    clean = np.asarray(_run(path, *_inputs()[:1], *_inputs()[1:], mask_mod=mods.causal))
    np.testing.assert_allclose(np.asarray(out)[~expected], clean[~expected], atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_nan_query_propagates_even_through_a_score_mod_that_drops_the_score(path):
    q, k, v = _inputs()
    q[0, 5, 1, 2] = np.nan
    flat = lambda s, b, h, qi, ki: jnp.where(ki >= 0, 0.5 * ki, s)  # ignores q·k entirely
    out = _run(path, q, k, v, score_mod=flat)
    expected = np.zeros((B, T, N), bool)
    expected[0, 5, 1] = True
    np.testing.assert_array_equal(_nan_rows(out), expected)


@pytest.mark.parametrize("path", PATHS)
def test_nan_key_hidden_by_score_mod_minus_inf_stays_hidden(path):
    q, k, v = _inputs()
    k[0, 9, 0, 0] = np.nan
    v[0, 9, 0, 0] = np.nan
    hide_9 = lambda s, b, h, qi, ki: jnp.where(ki == 9, -jnp.inf, s)
    out = _run(path, q, k, v, score_mod=hide_9)
    assert not np.isnan(np.asarray(out)).any()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(0, T, S), (B, 0, S), (B, T, 0), (B, 0, 0)])
def test_empty_axes_give_zeros(path, shape):
    b, t, s = shape
    q = jnp.ones((b, t, N, H))
    k, v = jnp.ones((b, s, K, H)), jnp.ones((b, s, K, HV))
    out, lse = jattn.flex_attention(q, k, v, mask_mod=mods.causal, return_residual=True, **PATHS[path])
    assert out.shape == (b, t, N, HV) and lse.shape == (b, t, N)
    assert not np.asarray(out).any() and np.all(np.asarray(lse) == -np.inf)
    dq = jax.grad(lambda q: jnp.sum(jattn.flex_attention(q, k, v, **PATHS[path])))(q)
    assert dq.shape == q.shape and not np.asarray(dq).any()
