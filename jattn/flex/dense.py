"""``implementation='xla'`` of flex attention: the dense reference built from the mods.

Shape glossary: T query length, S key length, d_k key head dim, d_v value head dim.

Evaluates ``score_mod`` and ``mask_mod`` on the whole [T, S] grid of one head and runs
jattn's masked softmax. Quadratic in memory; differentiable by plain autodiff (also in the
mods' closed-over arrays, and forward mode). Non-finite q/k/v rows follow ``jattn.core._finite``
exactly as the block-sparse kernel does: NaN reaches the rows that see them, and only those.
"""

from __future__ import annotations

import jax.numpy as jnp

from jattn.core import _finite
from jattn.core.attention import masked_softmax
from jattn.flex import convert


def dense_head(q, k, v, b, h, score_mod: convert.Converted | None, mask_mod: convert.Converted | None,
               score_consts, mask_consts, scale: float):
    """One head: q [T, d_k], k [S, d_k], v [S, d_v], b/h int32 scalars -> (out [T, d_v], lse [T])."""
    T, S = q.shape[0], k.shape[0]
    q_nan, k_nan, v_nan = (_finite.nan_rows(x, x.dtype) for x in (q, k, v))  # [T], [S], [S]
    q, k, v = _finite.zeroed(q), _finite.zeroed(k), _finite.zeroed(v)
    q_ids, kv_ids = jnp.arange(T, dtype=jnp.int32), jnp.arange(S, dtype=jnp.int32)
    logits = jnp.einsum("td,sd->ts", q, k) * scale  # [T, S]
    parts = []
    if score_mod is not None:
        logits = convert.on_tile(score_mod, score_consts, logits, b, h, q_ids, kv_ids).astype(q.dtype)
        parts.append(logits != -jnp.inf)  # [T, S]; a -inf score hides, NaN does not
    if mask_mod is not None:
        parts.append(convert.on_tile(mask_mod, mask_consts, b, h, q_ids, kv_ids))  # [T, S]
    visible = None
    for part in parts:
        visible = part if visible is None else visible & part
    # NaN of a non-finite query/key row, added after score_mod so that no mod can drop it.
    logits = logits + q_nan[:, None] + k_nan[None, :]  # [T, S]
    weights, lse = masked_softmax(logits, visible)  # [T, S], [T]
    out = jnp.einsum("ts,sd->td", weights, v)  # [T, d_v]
    out = out + _finite.nan_seen(v_nan, visible, T)[:, None]  # [T, d_v]
    return _finite.with_nan_rows(out, lse), lse  # [T, d_v], [T]
