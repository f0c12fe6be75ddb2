"""Scaled dot-product attention for one head: the readable reference.

Shape glossary: T query length, S key length, d_k query/key head dim, d_v value head dim.

Everything else in jattn (multi-head, batching, the chunked and ring paths) is measured
against this function.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jattn.core import _checks, _finite, spec
from jattn.core.masks import StructuredMask, combine_masks


class HeadOutput(NamedTuple):
    out: jax.Array  # [T, d_v]
    weights: jax.Array  # [T, S], fp32
    logsumexp: jax.Array  # [T], fp32; -inf for a row that sees no key


def soft_cap(logits: jax.Array, cap: float | None) -> jax.Array:
    """``cap * tanh(logits / cap)`` (Gemma 2's logit soft cap); identity for ``cap=None``."""
    return logits if cap is None else cap * jnp.tanh(logits / cap)


def masked_softmax(logits: jax.Array, visible: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Row softmax over the visible entries and the row logsumexp: [T, S] -> ([T, S], [T]).

    A row with nothing visible gives weights 0 and logsumexp -inf; a NaN among a row's
    visible logits makes its weights and logsumexp NaN. ``visible=None`` means every entry is
    visible. Plain JAX autodiff differentiates it (grad, jvp and vjp compose): the row max is
    a constant shift (``stop_gradient``), hidden entries pass through ``where`` and get no
    gradient. Written this way, a T = 512 training step (B=1, N=8, H=64) compiles to 25 MiB
    of temp (jax.nn: 26); a closed-form ``custom_jvp`` took 34-42 MiB, past glibc's 32 MiB
    mmap threshold, where every call page-faults and ran 2.5x slower than jax.nn.
    """
    if logits.shape[-1] == 0:  # no key at all: every row sees nothing
        return logits, jnp.sum(logits, axis=-1) - jnp.inf  # [T] of -inf, batched like logits
    if visible is None:  # every row sees a key: no empty rows to guard
        row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))  # [T, 1]
        lse = row_max + jnp.log(jnp.sum(jnp.exp(logits - row_max), axis=-1, keepdims=True))  # [T, 1]
        # exp(logits - lse) rather than p / sum(p): the backward then keeps one [T, S] buffer
        # fewer (T = 512 training step: 25 MiB of temp instead of 33).
        return jnp.exp(logits - lse), lse[:, 0]
    # Hide before exp: a hidden logit far above the row max must not overflow.
    logits = jnp.where(visible, logits, -jnp.inf)  # [T, S]
    row_max = jnp.max(logits, axis=-1, keepdims=True)  # [T, 1]
    row_max = jax.lax.stop_gradient(jnp.where(row_max == -jnp.inf, 0.0, row_max))  # NaN stays NaN
    p = jnp.exp(logits - row_max)  # [T, S]
    total = jnp.sum(p, axis=-1, keepdims=True)  # [T, 1]
    empty = total == 0  # NaN totals are not empty: they propagate
    safe = total + empty.astype(total.dtype)  # 1 where empty (this form keeps XLA's backward lean)
    lse = jnp.where(empty, -jnp.inf, row_max + jnp.log(safe))[:, 0]  # [T]
    return p / safe, lse


def attention_head(
    q: jax.Array,  # [T, d_k]
    k: jax.Array,  # [S, d_k]
    v: jax.Array,  # [S, d_v]
    mask: jax.Array | None,  # [T, S] bool, or broadcastable to it
    bias: jax.Array | None,  # [T, S] float, or broadcastable to it
    keep: jax.Array | None,  # [T, S] dropout multiplier (0 or 1/(1-rate)), or None
    structure: StructuredMask,
    scale: float,
    logits_soft_cap: float | None,
) -> HeadOutput:
    """softmax(soft_cap(q kᵀ · scale) + bias, masked) v, in fp32, for one head.

    A row that can see no key (everything masked, or every bias entry -inf) gives exactly 0
    with zero gradients, rather than the mean of v. A NaN or inf in a query, key or value row
    makes NaN the rows that see it, and only those (``jattn.core._finite``).
    """
    T, S = q.shape[0], k.shape[0]
    f32 = jnp.promote_types(q.dtype, jnp.float32)
    q_nan, k_nan, v_nan = (_finite.nan_rows(x, f32) for x in (q, k, v))  # [T], [S], [S]
    q, k, v = _finite.zeroed(q), _finite.zeroed(k), _finite.zeroed(v)
    logits = jnp.einsum("td,sd->ts", q, k, preferred_element_type=f32) * scale  # [T, S]
    logits = soft_cap(logits, logits_soft_cap)
    logits = logits + q_nan[:, None] + k_nan[None, :]  # [T, S]
    hidden_by_bias = None
    if bias is not None:
        logits = logits + bias.astype(f32)
        hidden_by_bias = jnp.broadcast_to(bias != -jnp.inf, (T, S))  # only -inf hides; NaN propagates
    tile = structure.tile(jnp.arange(T), jnp.arange(S))
    visible = combine_masks(hidden_by_bias, mask, tile)
    if visible is not None:
        visible = jnp.broadcast_to(visible, (T, S))
    weights, lse = masked_softmax(logits, visible)  # [T, S], [T]
    mixed = weights if keep is None else weights * keep
    out = jnp.einsum("ts,sd->td", mixed, v, preferred_element_type=f32)  # [T, d_v]
    # Rows that see a non-finite value are NaN; the product keeps their gradients NaN too.
    extra = (structure.window, structure.q_length, structure.kv_length, structure.q_segment_ids,
             structure.kv_segment_ids)
    only_causal = structure.is_causal and all(x is None for x in extra)
    if only_causal and mask is None and bias is None:  # row t sees keys 0..t + offset
        v_seen = _finite.nan_seen_prefix(v_nan, jnp.arange(T) + structure.offset)  # [T]
    else:
        v_seen = _finite.nan_seen(v_nan, visible, T)  # [T]
    out = out * (1 + v_seen[:, None])
    return HeadOutput(out.astype(q.dtype), weights, lse)


# One compiled program per shape for eager calls (op by op, a call would compile ~50 primitives).
_attention_head = jax.jit(attention_head, static_argnums=(6, 7, 8))


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    return_weights: bool = False,
):
    """Single-head attention: out = softmax(soft_cap(q kᵀ · scale) + bias, where mask) v.

    The seed formula for one head; for many heads and batches use
    ``jattn.dot_product_attention``. Logits, softmax and accumulation run in fp32.

    Args:
      q: ``[T, d_k]`` queries, floating.
      k: ``[S, d_k]`` keys.
      v: ``[S, d_v]`` values.
      mask: bool (True = attend), broadcastable to ``[T, S]``.
      bias: additive, broadcastable to ``[T, S]``, added after the soft cap.
      scale: multiplies ``q kᵀ``; default ``1/sqrt(d_k)``.
      logits_soft_cap: ``c`` replaces the scaled scores by ``c·tanh(scores/c)``.
      return_weights: also return the attention weights.

    Returns:
      ``out [T, d_v]`` in the dtype of ``q`` (a query row that sees no key is 0), or
      ``(out, weights [T, S])`` with ``return_weights=True``.
    """
    T, d_k = _checks.rank("q", q, 2, "[T, d_k]")
    S, d_k2 = _checks.rank("k", k, 2, "[S, d_k]")
    S2, _ = _checks.rank("v", v, 2, "[S, d_v]")
    for name, x in (("q", q), ("k", k), ("v", v)):
        _checks.floating(name, x)
    if d_k2 != d_k:
        raise ValueError(f"k: expected head dim {d_k} to match q [T, d_k]={q.shape}, got {k.shape}")
    if S2 != S:
        raise ValueError(f"v: expected length {S} to match k [S, d_k]={k.shape}, got {v.shape}")
    if mask is not None:
        _checks.boolean("mask", mask)
        _checks.broadcastable("mask", mask, (T, S), "[T, S]")
        mask = jnp.broadcast_to(mask, (T, S))
    if bias is not None:
        _checks.floating("bias", bias)
        _checks.broadcastable("bias", bias, (T, S), "[T, S]")
        bias = jnp.broadcast_to(bias, (T, S))
    scale, logits_soft_cap, _ = spec.options(d_k, scale, logits_soft_cap, None, None)
    res = _attention_head(q, k, v, mask, bias, None, StructuredMask(), scale, logits_soft_cap)
    return (res.out, res.weights) if return_weights else res.out
