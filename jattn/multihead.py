"""The implementations' registry, and running one of them over every head and batch row.

Shape glossary: B batch (flattened), T query length, S key length, N query heads, K key/value
heads (N = K·G), G query heads per kv head, H key head dim, Hv value head dim.

A single-head function (``register_implementation``) is lifted with ``jax.vmap``: over the G
query heads that share one kv head (K/V broadcast, never repeated in memory), over the K kv
heads, then over the batch. A whole-call function (``register_multihead_implementation``:
the block-sparse ``'chunked'`` loop, cuDNN) takes every head at once. Which one runs is
decided above this layer (``jattn.dispatch``); this module knows nothing of that choice.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from jattn.core.masks import StructuredMask
from jattn.core.spec import Arrays, Config  # noqa: F401  (re-exported: multihead.Config, multihead.Arrays)


# A single-head function: (q [T,H], k [S,H], v [S,Hv], mask [T,S]|None, bias [T,S]|None,
# keep [T,S]|None, structure, scale, logits_soft_cap, block_sizes) -> (out [T,Hv], weights [T,S]|None, lse [T])
HeadFn = Callable[..., tuple]

_HEAD_FNS: dict[str, HeadFn] = {}


def register_implementation(name: str, head_fn: HeadFn) -> None:
    """Make ``implementation=name`` run ``head_fn`` for every (batch, head) pair."""
    _HEAD_FNS[name] = head_fn


# A whole-call function: (config, arrays) -> (out [B, T, K, G, Hv], lse [B, T, K, G]), for
# backends that take every head at once (cuDNN).
_CALL_FNS: dict[str, Callable] = {}


def register_multihead_implementation(name: str, call_fn: Callable) -> None:
    """Make ``implementation=name`` run ``call_fn(config, arrays)`` on all heads at once."""
    _CALL_FNS[name] = call_fn


def registered_implementations() -> tuple[str, ...]:
    """Every name ``implementation=`` accepts: the built-ins and whatever was registered."""
    return tuple(sorted(set(_HEAD_FNS) | set(_CALL_FNS)))


def _squeeze_broadcast_axes(x: jax.Array | None):
    """[Bm, Km, Gm, T, S] -> (x without its size-1 leading axes, vmap axes for B, K, G).

    A size-1 axis is broadcast by vmap (in_axes None); any other is mapped at axis 0, since
    each vmap level strips the axis in front.
    """
    if x is None:
        return None, (None, None, None)
    axes = tuple(0 if d > 1 else None for d in x.shape[:3])
    unit = tuple(i for i, a in enumerate(axes) if a is None)
    return jnp.squeeze(x, unit), axes


def _lift(implementation: str, config: Config, a: Arrays):
    """vmap the registered single-head function over G, K and B. Returns out, lse, weights."""
    head_fn = _HEAD_FNS[implementation]

    def one_head(q, k, v, mask, bias, keep, q_len, kv_len, q_seg, kv_seg):
        structure = StructuredMask(
            config.is_causal, config.offset, config.window, q_len, kv_len, q_seg, kv_seg
        )
        return head_fn(
            q, k, v, mask, bias, keep, structure,
            scale=config.scale, logits_soft_cap=config.logits_soft_cap,
            block_sizes=config.block_sizes,
        )

    mask, (mask_b, mask_k, mask_g) = _squeeze_broadcast_axes(a.mask)
    bias, (bias_b, bias_k, bias_g) = _squeeze_broadcast_axes(a.bias)
    # Axes, innermost first: over G query heads, over K kv heads, over B.
    if a.query.shape[3] == 1:  # one query head per kv head: no vmap level (XLA would copy
        # the [T, S] logits between two orders of the batch axes that differ only by this 1)
        def over_g(q, k, v, mask, bias, keep, *structure):
            out, weights, lse = one_head(q[:, 0], k, v, mask, bias, None if keep is None else keep[0], *structure)
            return out[:, None], None if weights is None else weights[None], lse[:, None]
    else:
        over_g = jax.vmap(
            one_head,
            in_axes=(1, None, None, mask_g, bias_g, 0, None, None, None, None),
            out_axes=(1, 0, 1),  # out [T, G, Hv], weights [G, T, S], lse [T, G]
        )
    over_k = jax.vmap(
        over_g,
        in_axes=(1, 1, 1, mask_k, bias_k, 0, None, None, None, None),
        out_axes=(1, 0, 1),  # out [T, K, G, Hv], weights [K, G, T, S], lse [T, K, G]
    )
    over_b = jax.vmap(
        over_k,
        in_axes=(0, 0, 0, mask_b, bias_b, 0, 0, 0, 0, 0),
        out_axes=(0, 0, 0),  # out [B, T, K, G, Hv], weights [B, K, G, T, S], lse [B, T, K, G]
    )
    return over_b(
        a.query, a.key, a.value, mask, bias, a.keep,
        a.q_lengths, a.kv_lengths, a.q_segment_ids, a.kv_segment_ids,
    )


@functools.partial(jax.jit, static_argnames=("implementation", "config", "return_weights"))
def run(implementation: str, config: Config, arrays: Arrays, dropout_rng, return_weights: bool):
    """(out, lse, weights or None): the weights leave the program only when asked for."""
    if config.dropout_rate > 0 and dropout_rng is not None:
        B, T, K, G, _ = arrays.query.shape
        S = arrays.key.shape[1]
        shape = (1, 1, 1, T, S) if config.broadcast_dropout else (B, K, G, T, S)
        keep = jax.random.bernoulli(dropout_rng, 1.0 - config.dropout_rate, shape)
        keep = jnp.broadcast_to(keep.astype(jnp.float32) / (1.0 - config.dropout_rate), (B, K, G, T, S))
        arrays = arrays._replace(keep=keep)
    if implementation in _CALL_FNS:
        out, lse = _CALL_FNS[implementation](config, arrays)
        return out, lse, None
    out, weights, lse = _lift(implementation, config, arrays)
    return out, lse, weights if return_weights else None


