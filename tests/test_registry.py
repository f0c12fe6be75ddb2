"""The implementation registry is an extension point: a registered head function runs for
``implementation=<its name>``, ``explain_implementation`` names it, and unknown names list
every registered one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import dispatch, multihead


def _doubled_head(q, k, v, mask, bias, keep, structure, *, scale, logits_soft_cap, block_sizes):
    """The reference head with its output doubled, so the test can see that it ran."""
    out, weights, lse = dispatch._xla_head(q, k, v, mask, bias, keep, structure, scale=scale,
                                           logits_soft_cap=logits_soft_cap, block_sizes=block_sizes)
    return 2 * out, weights, lse


multihead.register_implementation("test_doubled", _doubled_head)


def test_registered_implementation_runs_and_is_explained():
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 5, 4, 3))  # each [B, T, N, H]
    got = jattn.dot_product_attention(q, k, v, is_causal=True, implementation="test_doubled")
    want = jattn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    np.testing.assert_allclose(got, 2 * want, rtol=1e-6, atol=1e-6)
    choice = jattn.explain_implementation(q, k, v, implementation="test_doubled")
    assert choice == dispatch.Choice("test_doubled", "requested")
    assert "test_doubled" in multihead.registered_implementations()
    assert set(dispatch.IMPLEMENTATIONS) <= set(multihead.registered_implementations())


def test_registered_implementation_falls_back_for_weights_with_a_warning():
    q = jnp.ones((1, 3, 2, 4))
    with pytest.warns(UserWarning, match="implementation='test_doubled' falls back to 'xla'"):
        out, w = jattn.dot_product_attention(q, q, q, implementation="test_doubled", return_weights=True)
    np.testing.assert_allclose(out, jattn.dot_product_attention(q, q, q), rtol=1e-6)


def test_unknown_implementation_lists_the_registered_ones():
    q = jnp.ones((1, 3, 2, 4))
    with pytest.raises(ValueError, match=r"implementation: expected None or one of \(.*'test_doubled'.*\)"):
        jattn.dot_product_attention(q, q, q, implementation="flash")
