"""What ``jattn.nnx.MultiHeadAttention`` and ``jattn.linen.MultiHeadAttention`` share.

Shape glossary: B batch (any number of leading dims), T query length (new tokens in decode),
S key length, L cache capacity, F input features, N query heads, K kv heads, H head dim.

The two modules differ only in how Flax stores parameters, the cache and random streams.
Everything between the projections is here, so the two cannot drift: the head arithmetic and
its checks (``head_dims``), the input defaults and checks (``module_inputs``), the dropout
decision (``dropout_active``), and ``attend``: RoPE, the KV-cache decode step, the call of
``attention_fn`` (one keyword list, ``precision=`` and the sow target included) and the
poisoning of cache rows that a decode under ``jit`` could not write (see ``jattn._kv_cache``).
A plain causal decode step of at most ``DECODE_MAX_TOKENS`` new tokens (default
``attention_fn``, no mask, lengths, dropout, sow, implementation or precision) goes through
``jattn.decode_attention`` instead, which reads only the written part of each row's cache.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from jattn import _kv_cache
from jattn.core import _checks
from jattn.kernels import paged
from jattn.kernels.decode import decode_attention
from jattn.flax_attention_fn import flax_attention_fn
from jattn.rope import apply_rope

# Longest step sent to ``decode_attention`` (its design range: a token, or a speculative
# draft). A longer step (a prompt) is a prefill, whose logits the general path computes as
# matrix products; through decode_attention a 2048-token prompt took twice as long.
DECODE_MAX_TOKENS = 16


def head_dims(num_heads, num_kv_heads, qkv_features, rope_base) -> tuple[int, int, int]:
    """``(N, K, H)`` from the module's settings, or a ValueError naming the bad argument.

    Args:
      num_heads: N, a positive int.
      num_kv_heads: K (None means N); must divide N.
      qkv_features: N·H, a multiple of N.
      rope_base: RoPE base or None; RoPE needs an even H.

    Returns:
      ``(N, K, H)``.
    """
    for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("qkv_features", qkv_features)):
        if value is None and name != "num_heads":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    N = num_heads
    K = N if num_kv_heads is None else num_kv_heads
    if N % K:
        raise ValueError(f"num_kv_heads: expected a divisor of num_heads={N}, got {K}")
    if qkv_features % N:
        raise ValueError(f"qkv_features: expected a multiple of num_heads={N}, got {qkv_features}")
    H = qkv_features // N
    if rope_base is not None and H % 2:
        raise ValueError(f"rope_base: RoPE needs an even head dim, got head_dim={H}")
    return N, K, H


def module_inputs(inputs_q, inputs_k, inputs_v, features: tuple[int, int] | None = None):
    """Flax's defaults (``inputs_k = inputs_q``, ``inputs_v = inputs_k``) and rank checks.

    Args:
      inputs_q: ``[*B, T, F]``.
      inputs_k: ``[*B, S, F_kv]`` or None (then ``inputs_q``).
      inputs_v: ``[*B, S, F_kv]`` or None (then ``inputs_k``).
      features: ``(F, F_kv)`` to check the last dims against, or None.

    Returns:
      ``(inputs_q, inputs_k, inputs_v)``.
    """
    if inputs_k is None:
        if inputs_v is not None:
            raise ValueError("inputs_k: expected an array when inputs_v is given, got None")
        inputs_k = inputs_q
    if inputs_v is None:
        inputs_v = inputs_k
    wanted = (None, None, None) if features is None else (features[0], features[1], features[1])
    for name, x, f in zip(("inputs_q", "inputs_k", "inputs_v"), (inputs_q, inputs_k, inputs_v), wanted):
        shape = _checks.rank(name, x, tuple(range(2, 64)), "[*B, length, features]")
        if f is not None and shape[-1] != f:
            raise ValueError(f"{name}: expected {f} features (last dim), got shape {shape}")
    return inputs_q, inputs_k, inputs_v


def check_lengths_use(lengths, decode: bool) -> None:
    """``lengths`` only means something in decode mode."""
    if lengths is not None and not decode:
        raise ValueError("lengths: only used with decode=True (use mask otherwise), got an array")


def dropout_active(dropout_rate: float, deterministic: bool | None) -> bool:
    """Whether attention dropout runs; ``deterministic`` is the call's or the module's setting."""
    if dropout_rate == 0.0:
        return False
    if deterministic is None:
        raise ValueError(
            "deterministic: expected True or False (as a call argument or constructor argument) "
            f"since dropout_rate={dropout_rate} > 0, got None"
        )
    return not deterministic


def attend(
    query,
    key,
    value,
    *,
    attention_fn: Callable,
    cache: _kv_cache.Cache | None,
    mask,
    lengths,
    is_causal: bool,
    positions,
    kv_positions,
    rope_base: float | None,
    dropout_rng,
    dropout_rate: float,
    broadcast_dropout: bool,
    dtype,
    precision,
    sow_into,
    implementation: str | None,
    logits_soft_cap: float | None,
):
    """Attention of projected heads, with or without the KV cache.

    Every keyword is required, so a setting one module forgets is a TypeError, not a drift.

    Args:
      query: ``[*B, T, N, H]`` projected (and normalised) queries.
      key: ``[*B, S, K, H]`` projected keys (in decode mode, the T new tokens').
      value: ``[*B, S, K, Hv]``.
      attention_fn: called as Flax calls it, plus ``implementation=`` and ``logits_soft_cap=``.
      cache: the module's ``Cache`` in decode mode, else None.
      mask: ``[*B, N|1, T, S]`` (``[*B, N|1, T, L]`` in decode mode) or None.
      lengths: ``[*B]`` valid new tokens per row (decode mode only) or None.
      is_causal: causal mask; in decode mode aligned to each row's cache position.
      positions: ``[*B, T]`` RoPE positions of the queries, or None for the default
        (``0..T-1``, or each row's cache position in decode mode).
      kv_positions: ``[*B, S]`` RoPE positions of the keys, or None for the default.
      rope_base: RoPE base, or None for no RoPE.
      dropout_rng: PRNG key when dropout runs, else None.
      dropout_rate, broadcast_dropout, dtype, precision, implementation, logits_soft_cap:
        passed to ``attention_fn``.
      sow_into: the module to sow ``attention_weights`` into, or None.

    Returns:
      ``(x, new_cache)``: ``x [*B, T, N, Hv]``, and in decode mode the updated ``Cache`` (else
      None). Rows of ``x`` whose decode step was out of range under ``jit`` are NaN.
    """
    ok = None
    if cache is not None:
        T = query.shape[-3]
        _kv_cache.check_step(cache, key.shape, T, lengths, mask, query.shape[-2])
        if rope_base is not None:
            default = _kv_cache.positions(cache.index, T)  # [*B, T]
            query = apply_rope(query, default if positions is None else positions, rope_base)
            key = apply_rope(key, default if kv_positions is None else kv_positions, rope_base)
        step = _kv_cache.step(cache, key, value, lengths, is_causal=is_causal)
        plain_step = mask is None  # no caller mask: the split-K decode path below may apply
        mask = step.mask if mask is None else jnp.logical_and(step.mask, jnp.asarray(mask) != 0)
        key, value = step.cache.key, step.cache.value  # [*B, L, K, H]
        ok = step.ok
        if (attention_fn is flax_attention_fn and is_causal and plain_step and lengths is None
                and T <= DECODE_MAX_TOKENS and dropout_rng is None and sow_into is None
                and implementation is None and precision is None):
            # A plain causal decode step: the split-K path reads only each row's written slots
            # (``jattn.decode_attention``), not the whole cache through a [T, L] mask.
            dt = dtype or jnp.result_type(query, key, value)
            lengths_now = jnp.clip(step.cache.index, 0, key.shape[-3])  # poisoned rows: NaN below
            x = decode_attention(*(jnp.asarray(a, dt) for a in (query, key, value)), lengths=lengths_now,
                                 logits_soft_cap=logits_soft_cap)  # [*B, T, N, Hv]
            return jnp.where(jnp.reshape(ok, ok.shape + (1, 1, 1)), x, jnp.nan), step.cache
        is_causal = False  # the step mask holds the cache-aligned causal structure
    elif rope_base is not None:
        T, S = query.shape[-3], key.shape[-3]
        query = apply_rope(query, jnp.arange(T) if positions is None else positions, rope_base)
        key = apply_rope(key, jnp.arange(S) if kv_positions is None else kv_positions, rope_base)

    x = attention_fn(
        query, key, value, mask=mask,
        dropout_rng=dropout_rng, dropout_rate=dropout_rate, broadcast_dropout=broadcast_dropout,
        deterministic=dropout_rng is None, dtype=dtype, precision=precision, module=sow_into,
        is_causal=is_causal, implementation=implementation, logits_soft_cap=logits_soft_cap,
    )  # [*B, T, N, Hv]
    if ok is None:
        return x, None
    x = jnp.where(jnp.reshape(ok, ok.shape + (1, 1, 1)), x, jnp.nan)  # poison rows the cache could not take
    return x, step.cache


def attend_paged(query, key, value, cache: paged.PagedKVCache, *, mask, lengths, is_causal: bool,
                 positions, kv_positions, rope_base: float | None, logits_soft_cap: float | None):
    """A decode call over a paged cache: reserve pages, append, attend over the pages.

    Args:
      query: ``[B, T, N, H]`` (one batch dim: the cache's sequence slots).
      key, value: ``[B, T, K, H|Hv]`` the new tokens' keys and values, all T real.
      cache: the module's ``jattn.kernels.paged.PagedKVCache``.
      positions, kv_positions: RoPE positions, default each sequence's length + t.

    Returns:
      ``(x [B, T, N, Hv], new_cache)``. Misuse raises eagerly; under ``jit`` the sequence is
      flagged and its outputs are NaN (see ``jattn.kernels.paged``).
    """
    if mask is not None or lengths is not None or not is_causal:
        raise ValueError(
            "decode: a paged cache takes plain causal steps (is_causal=True, no mask, no lengths); "
            f"got is_causal={is_causal}, mask={'None' if mask is None else 'an array'}, "
            f"lengths={'None' if lengths is None else 'an array'}"
        )
    T = query.shape[-3]
    if rope_base is not None:
        default = _kv_cache.positions(cache.lengths, T)  # [B, T]
        query = apply_rope(query, default if positions is None else positions, rope_base)
        key = apply_rope(key, default if kv_positions is None else kv_positions, rope_base)
    num_new = jnp.full(cache.lengths.shape, T, jnp.int32)
    cache = paged.append(paged.allocate(cache, num_new), key, value, num_new)
    return paged.paged_decode_attention(query, cache, logits_soft_cap=logits_soft_cap), cache
