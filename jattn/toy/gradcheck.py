"""Start-up check: jattn's attention gradients against finite differences.

Shape glossary: B batch, T query length, S key length, N heads, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.test_util import check_grads

import jattn

# Small, odd shapes: cheap, and they exercise a causal mask that is not square.
B, T, S, N, H = 2, 5, 7, 2, 3


def check_attention_grads(seed: int = 0) -> str:
    """Compare d/d(q, k, v) of ``jattn.dot_product_attention`` (causal) with finite differences.

    Runs in float64 so the comparison is tight; raises ``RuntimeError`` if it fails and
    otherwise returns a one-line report.
    """
    with jax.enable_x64(True):
        kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
        q = jax.random.normal(kq, (B, T, N, H), jnp.float64)  # [B, T, N, H]
        k = jax.random.normal(kk, (B, S, N, H), jnp.float64)  # [B, S, N, H]
        v = jax.random.normal(kv, (B, S, N, H), jnp.float64)  # [B, S, N, H]

        @jax.jit
        def f(q, k, v):
            return jattn.dot_product_attention(q, k, v, is_causal=True, causal_alignment="bottom_right")

        try:
            check_grads(f, (q, k, v), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)
        except AssertionError as e:
            raise RuntimeError(f"check_grads: jattn attention gradients disagree with finite differences: {e}") from e
    return (f"check_grads: d softmax(QKᵀ/√d_k)V / d(Q, K, V) of jattn.dot_product_attention "
            f"(causal, [B,T,N,H]=[{B},{T},{N},{H}], S={S}, float64) matches finite differences: OK")
