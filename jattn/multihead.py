"""Multi-head, batched attention: a drop-in for ``jax.nn.dot_product_attention``.

Shape glossary: B batch (any number of leading dims, flattened inside), T query length,
S key length, N query heads, K key/value heads (N = K·G), G query heads per kv head,
H key head dim, Hv value head dim.

The single-head function of the chosen implementation is lifted with ``jax.vmap``: over the
G query heads that share one kv head (K/V broadcast, never repeated in memory), over the K kv
heads, then over the batch.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jattn import _checks
from jattn.masks import StructuredMask


class Config(NamedTuple):
    """Static (hashable) settings of one call; everything else is an array. Which implementation
    runs is not part of it: ``dispatch`` chooses that from the settings."""

    scale: float
    is_causal: bool
    offset: int  # query row i sits at key position i + offset
    window: tuple[int, int] | None
    logits_soft_cap: float | None
    dropout_rate: float
    broadcast_dropout: bool  # one [T, S] keep-mask shared by every batch row and head
    block_sizes: tuple[int, int] | None  # (block_q, block_kv) for 'chunked'; None = default


class Arrays(NamedTuple):
    """The array inputs, normalised: batch dims flattened to one B, head axis split K×G."""

    query: jax.Array  # [B, T, K, G, H]
    key: jax.Array  # [B, S, K, H]
    value: jax.Array  # [B, S, K, Hv]
    mask: jax.Array | None  # [Bm, Km, Gm, T, S] bool, Bm in {1, B}, (Km, Gm) in {(1, 1), (K, G)}
    bias: jax.Array | None  # [Bm, Km, Gm, T, S] float
    keep: jax.Array | None  # [B, K, G, T, S] dropout multiplier
    q_lengths: jax.Array | None  # [B]
    kv_lengths: jax.Array | None  # [B]
    q_segment_ids: jax.Array | None  # [B, T]
    kv_segment_ids: jax.Array | None  # [B, S]


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
def _run(implementation: str, config: Config, arrays: Arrays, dropout_rng, return_weights: bool):
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


def _split_heads(x, name: str, batch_shape, N: int, K: int, T: int, S: int):
    """[*, N|1, T|1, S|1] broadcastable to [*B, N, T, S] -> [Bm, Km, Gm, T, S]."""
    if x is None:
        return None
    full = batch_shape + (N, T, S)
    padded = _checks.broadcastable(name, x, full, "[*B, N, T, S]")
    x = jnp.reshape(x, padded)
    nb = len(batch_shape)
    if all(d == 1 for d in padded[:nb]):
        x = jnp.reshape(x, (1,) + padded[nb:])  # [1, N|1, T|1, S|1]
    else:
        x = jnp.broadcast_to(x, batch_shape + padded[nb:])
        x = jnp.reshape(x, (math.prod(batch_shape),) + padded[nb:])  # [B, N|1, T|1, S|1]
    Bm, Nm = x.shape[:2]
    heads = (K, N // K) if Nm == N else (1, 1)
    x = jnp.broadcast_to(x, (Bm, Nm, T, S))
    return jnp.reshape(x, (Bm,) + heads + (T, S))  # [Bm, Km, Gm, T, S]


def _per_batch(x, name: str, dtype_check, batch_shape, trailing: tuple[int, ...], layout: str):
    """Lengths [*B] or segment ids [*B, L] -> flattened [B] / [B, L]."""
    if x is None:
        return None
    dtype_check(name, x)
    _checks.exact_shape(name, x, batch_shape + trailing, layout)
    return jnp.reshape(jnp.asarray(x), (math.prod(batch_shape),) + trailing)


def dot_product_attention(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: str | None = None,
    return_residual: bool = False,
    causal_alignment: str = "top_left",
    q_segment_ids=None,
    kv_segment_ids=None,
    logits_soft_cap: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng=None,
    broadcast_dropout: bool = False,
    return_weights: bool = False,
    block_sizes: tuple[int, int] | None = None,
):
    """Multi-head attention with the parameters and semantics of ``jax.nn.dot_product_attention``.

    out[b, t, n] = softmax(soft_cap(q·kᵀ·scale) + bias, masked) v, per head n, with the kv head
    n // (N/K) for grouped queries.

    Shapes: ``query [*B, T, N, H]`` (``[T, N, H]`` unbatched), ``key [*B, S, K, H]``,
    ``value [*B, S, K, Hv]``; N must be a multiple of K (GQA/MQA). ``mask`` (bool, True =
    attend) and ``bias`` (additive) broadcast to ``[*B, N, T, S]``. Returns ``[*B, T, N, Hv]``.

    Args beyond jax.nn:
      causal_alignment: ``'top_left'`` (jax.nn's default: query i sees keys ``<= i``) or
        ``'bottom_right'`` (query i sees keys ``<= i + S - T``: the last query sees every key,
        as in KV-cache decoding). ``local_window_size`` is centred on the same diagonal.
      q_segment_ids, kv_segment_ids: ``[*B, T]`` / ``[*B, S]`` integers; a query attends only
        to keys of its own segment (packed sequences). Give both or neither.
      logits_soft_cap: ``c`` replaces the scaled scores by ``c·tanh(scores/c)`` (before bias).
      dropout_rate, dropout_rng: dropout on the attention weights; active only if both given.
      broadcast_dropout: one keep-mask ``[T, S]`` shared by all batch rows and heads (Flax's
        ``broadcast_dropout=True``); by default every (batch, head) draws its own.
      return_weights: also return the (pre-dropout) weights ``[*B, N, T, S]``, in fp32.
      block_sizes: ``(block_q, block_kv)`` for ``implementation='chunked'``.

    Returns ``out``, or a tuple ``(out, residual?, weights?)`` with the fp32 logsumexp residual
    ``[*B, T, N]`` (stop-gradient, as in jax.nn) when ``return_residual`` and the weights when
    ``return_weights``.

    Semantics where jattn differs from jax.nn on purpose: a query row that can see no key
    (mask, ``-inf`` bias, lengths, window, segments) returns exactly 0 with zero gradients
    and residual ``-inf`` (jax.nn returns the mean of ``value``, or NaN for a ``-inf``
    bias). Logits, softmax and accumulation are fp32 (float64 for float64 inputs); the output has
    the dtype of ``query``.
    """
    from jattn import dispatch  # late import: dispatch registers the implementations

    batch_shape, T, N, H, S, K, Hv = _checks.qkv(query, key, value)
    if mask is not None:
        _checks.boolean("mask", mask)
    if bias is not None:
        _checks.floating("bias", bias)
    mask5 = _split_heads(mask, "mask", batch_shape, N, K, T, S)
    bias5 = _split_heads(bias, "bias", batch_shape, N, K, T, S)
    q_lengths = _per_batch(query_seq_lengths, "query_seq_lengths", _checks.integer, batch_shape, (), "[*B]")
    kv_lengths = _per_batch(key_value_seq_lengths, "key_value_seq_lengths", _checks.integer, batch_shape, (), "[*B]")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError(
            "q_segment_ids, kv_segment_ids: expected both or neither, got "
            f"q_segment_ids={'None' if q_segment_ids is None else 'an array'}, "
            f"kv_segment_ids={'None' if kv_segment_ids is None else 'an array'}"
        )
    q_seg = _per_batch(q_segment_ids, "q_segment_ids", _checks.integer, batch_shape, (T,), "[*B, T]")
    kv_seg = _per_batch(kv_segment_ids, "kv_segment_ids", _checks.integer, batch_shape, (S,), "[*B, S]")
    window = None if local_window_size is None else _checks.window("local_window_size", local_window_size, T + S)
    _checks.choice("causal_alignment", causal_alignment, ("top_left", "bottom_right"))
    scale = _checks.default_scale(H) if scale is None else _checks.concrete_number("scale", scale)
    if logits_soft_cap is not None:
        logits_soft_cap = _checks.concrete_number("logits_soft_cap", logits_soft_cap, low=0, low_open=True)
    dropout_rate = _checks.concrete_number("dropout_rate", dropout_rate, low=0, high=1, high_open=True)
    if dropout_rng is not None and dropout_rate > 0:
        _checks.shape_of("dropout_rng", dropout_rng)
    else:
        dropout_rate, dropout_rng = 0.0, None
    if block_sizes is not None:
        if (not isinstance(block_sizes, (tuple, list)) or len(block_sizes) != 2
                or not all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b > 0
                           for b in block_sizes)):
            raise ValueError(f"block_sizes: expected (block_q, block_kv) of positive ints, got {block_sizes!r}")
        block_sizes = tuple(int(b) for b in block_sizes)

    B = math.prod(batch_shape)
    arrays = Arrays(
        query=jnp.reshape(query, (B, T, K, N // K, H)),
        key=jnp.reshape(key, (B, S, K, H)),
        value=jnp.reshape(value, (B, S, K, Hv)),
        mask=mask5, bias=bias5, keep=None,
        q_lengths=q_lengths, kv_lengths=kv_lengths, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
    )
    config = Config(
        scale=scale,
        is_causal=bool(is_causal),
        offset=0 if causal_alignment == "top_left" else S - T,
        window=window,
        logits_soft_cap=logits_soft_cap,
        dropout_rate=dropout_rate,
        broadcast_dropout=bool(broadcast_dropout),
        block_sizes=block_sizes,
    )
    chosen = dispatch.resolve(implementation, config, arrays, return_weights=return_weights)
    try:
        out, lse, weights = _run(chosen, config, arrays, dropout_rng, return_weights)
    except TypeError as e:  # JAX's message for jvp of a custom_vjp names none of this
        if chosen != "chunked" or "forward-mode" not in str(e):
            raise
        how = "requested" if implementation == "chunked" else "chosen automatically for long sequences"
        raise TypeError(
            f"implementation: 'chunked' ({how}) supports reverse-mode autodiff (grad, vjp) but not "
            f"forward-mode (jax.jvp, jax.jacfwd, jax.hessian); pass implementation='xla' for "
            f"forward-mode derivatives"
        ) from e
    out = jnp.reshape(out, batch_shape + (T, N, Hv))  # [*B, T, N, Hv]
    extras = []
    if return_residual:
        extras.append(jax.lax.stop_gradient(jnp.reshape(lse, batch_shape + (T, N))))  # [*B, T, N]
    if return_weights:
        extras.append(jnp.reshape(weights, batch_shape + (N, T, S)))  # [*B, N, T, S]
    return (out, *extras) if extras else out
