"""The public arguments of ``dot_product_attention``, checked and normalised into one spec.

Shape glossary: B batch (any number of leading dims, flattened inside), T query length,
S key length, N query heads, K key/value heads (N = K·G), G query heads per kv head,
H key head dim, Hv value head dim.

``check_arrays`` is the one validator of the array arguments every entry point shares
(``dot_product_attention`` and its 'chunked' kernel, ring, Ulysses, ``sequence_parallel_attention``,
``context_parallel_decode``, ``decode_attention``, the paged cache, ``flex_attention``):
query/key/value, dense bias/mask, lengths, segment ids. ``options`` normalises the scalar
options they share (scale, soft cap, window) and ``block_sizes`` the tile sizes. Every
check runs on static shapes and dtypes (``jattn.core._checks``) and raises a
``ValueError``/``TypeError`` naming the argument, expected vs actual, before anything
reaches XLA. ``attention_spec`` builds on them the normalised call of the functional API:
a hashable ``Config`` and the ``Arrays`` with batch dims flattened and heads split K×G.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jattn.core import _checks


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


class AttentionSpec(NamedTuple):
    """A checked call: what runs (``config``, ``arrays``) and how to shape its results."""

    batch_shape: tuple[int, ...]
    T: int
    N: int
    S: int
    Hv: int
    config: Config
    arrays: Arrays
    dropout_rng: jax.Array | None
    implementation: str | None
    return_residual: bool
    return_weights: bool


class Shapes(NamedTuple):
    """The sizes of a checked call (see the glossary); ``batch_shape`` is ``(B,)`` for rank-4 entry points."""

    batch_shape: tuple[int, ...]
    T: int
    N: int
    H: int
    S: int
    K: int
    Hv: int

    @property
    def B(self) -> int:
        return math.prod(self.batch_shape)


# The array arguments, by the names check_arrays reports them under unless ``names`` says otherwise.
_ARGS = ("query", "key", "value", "bias", "mask", "query_seq_lengths", "key_value_seq_lengths", "q_segment_ids",
         "kv_segment_ids")


def check_arrays(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    names: dict[str, str] | None = None,
    any_batch: bool = True,
    dense_masks: str | None = None,
    given: str = "query",
    T: str = "T",
    nonempty: bool = False,
) -> Shapes:
    """Check the array arguments of an attention call; the one validator every entry point uses.

    Args:
      query: ``[*B, T, N, H]`` floating.
      key: ``[*B, S, K, H]``, the dtype of ``query``; N a multiple of K.
      value: ``[*B, S, K, Hv]``, the dtype of ``query``.
      bias: None, or floating, broadcastable to ``[*B, N, T, S]``.
      mask: None, or bool, broadcastable to ``[*B, N, T, S]``.
      query_seq_lengths: None, or integer ``[*B]``.
      key_value_seq_lengths: None, or integer ``[*B]``.
      q_segment_ids: None, or integer ``[*B, T]``; given together with ``kv_segment_ids``.
      kv_segment_ids: None, or integer ``[*B, S]``.
      names: what the caller calls these arguments where it differs from the keys here, e.g.
        ``{"key": "key_cache", "key_value_seq_lengths": "lengths"}``.
      any_batch: False asks for exactly one batch dim ``B`` (rank 4).
      dense_masks: None allows ``bias``/``mask``; a reason (why the entry point has no dense
        masks) refuses them with that reason.
      given: ``'key'`` where key/value are a cache whose shape is fixed: a mismatch is
        reported on the query.
      T: the name of the query length in messages (``'Tq'`` for decoding).
      nonempty: T >= 1 and S >= 1 are required.

    Returns:
      ``Shapes(batch_shape, T, N, H, S, K, Hv)``.
    """
    name = dict(zip(_ARGS, _ARGS)) | (names or {})
    b = "*B" if any_batch else "B"
    batch_shape, Tn, N, H, S, K, Hv = _checks.qkv(
        query, key, value, names=(name["query"], name["key"], name["value"]), any_batch=any_batch, given=given, T=T)
    if nonempty and (Tn == 0 or S == 0):
        raise ValueError(f"{name['query']}, {name['key']}: expected {T} >= 1 and S >= 1, got {T}={Tn}, S={S}")
    for arg, x, dtype_check in (("bias", bias, _checks.floating), ("mask", mask, _checks.boolean)):
        if x is None:
            continue
        if dense_masks is not None:
            raise ValueError(
                f"{name[arg]}: {dense_masks}; a dense [T, S] {arg} is not supported, got an array of "
                f"shape {_checks.shape_of(name[arg], x)}"
            )
        dtype_check(name[arg], x)
        _checks.broadcastable(name[arg], x, batch_shape + (N, Tn, S), f"[{b}, N, {T}, S]")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        qs, kvs = name["q_segment_ids"], name["kv_segment_ids"]
        raise ValueError(
            f"{qs}, {kvs}: expected both or neither, got {qs}={'None' if q_segment_ids is None else 'an array'}, "
            f"{kvs}={'None' if kv_segment_ids is None else 'an array'}"
        )
    per_batch = (
        ("query_seq_lengths", query_seq_lengths, (), f"[{b}]"),
        ("key_value_seq_lengths", key_value_seq_lengths, (), f"[{b}]"),
        ("q_segment_ids", q_segment_ids, (Tn,), f"[{b}, {T}]"),
        ("kv_segment_ids", kv_segment_ids, (S,), f"[{b}, S]"),
    )
    for arg, x, trailing, layout in per_batch:
        if x is not None:
            _checks.integer(name[arg], x)
            _checks.exact_shape(name[arg], x, batch_shape + trailing, layout)
    return Shapes(batch_shape, Tn, N, H, S, K, Hv)


def options(H: int, scale, logits_soft_cap, local_window_size, window_limit: int | None):
    """(scale, logits_soft_cap, window) normalised: static floats, ``(left, right)`` or None."""
    scale = _checks.default_scale(H) if scale is None else _checks.concrete_number("scale", scale)
    if logits_soft_cap is not None:
        logits_soft_cap = _checks.concrete_number("logits_soft_cap", logits_soft_cap, low=0, low_open=True)
    window = None if local_window_size is None else _checks.window("local_window_size", local_window_size,
                                                                   window_limit)
    return scale, logits_soft_cap, window


def check_block_sizes(sizes, divide: tuple[int, int] | None = None, what: str = "query and key lengths"):
    """``(block_q, block_kv)`` of positive ints (dividing ``divide``, the ``what``, where the
    caller needs that) as a tuple, or None."""
    if sizes is None:
        return None
    ok = (isinstance(sizes, (tuple, list)) and len(sizes) == 2
          and all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b > 0 for b in sizes))
    if not ok or (divide is not None and (divide[0] % sizes[0] or divide[1] % sizes[1])):
        dividing = "" if divide is None else f" dividing the {what} {tuple(divide)}"
        raise ValueError(f"block_sizes: expected (block_q, block_kv) of positive ints{dividing}, got {sizes!r}")
    return int(sizes[0]), int(sizes[1])


def _split_heads(x, batch_shape, N: int, K: int, T: int, S: int):
    """[*, N|1, T|1, S|1] broadcastable to [*B, N, T, S] (checked) -> [Bm, Km, Gm, T, S]."""
    if x is None:
        return None
    nb = len(batch_shape)
    padded = (1,) * (nb + 3 - jnp.ndim(x)) + tuple(jnp.shape(x))
    x = jnp.reshape(x, padded)
    if all(d == 1 for d in padded[:nb]):
        x = jnp.reshape(x, (1,) + padded[nb:])  # [1, N|1, T|1, S|1]
    else:
        x = jnp.broadcast_to(x, batch_shape + padded[nb:])
        x = jnp.reshape(x, (math.prod(batch_shape),) + padded[nb:])  # [B, N|1, T|1, S|1]
    Bm, Nm = x.shape[:2]
    heads = (K, N // K) if Nm == N else (1, 1)
    x = jnp.broadcast_to(x, (Bm, Nm, T, S))
    return jnp.reshape(x, (Bm,) + heads + (T, S))  # [Bm, Km, Gm, T, S]


def _flat(x, B: int, trailing: tuple[int, ...] = ()):
    """Lengths [*B] / segment ids [*B, L] (checked) -> [B] / [B, L]; None stays None."""
    return None if x is None else jnp.reshape(jnp.asarray(x), (B,) + trailing)


def attention_spec(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    scale=None,
    is_causal=False,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    local_window_size=None,
    implementation=None,
    return_residual=False,
    causal_alignment="top_left",
    q_segment_ids=None,
    kv_segment_ids=None,
    logits_soft_cap=None,
    dropout_rate=0.0,
    dropout_rng=None,
    broadcast_dropout=False,
    return_weights=False,
    block_sizes=None,
) -> AttentionSpec:
    """Check ``dot_product_attention``'s arguments (same names) and normalise them."""
    sh = check_arrays(query, key, value, bias, mask, query_seq_lengths=query_seq_lengths,
                      key_value_seq_lengths=key_value_seq_lengths, q_segment_ids=q_segment_ids,
                      kv_segment_ids=kv_segment_ids)
    batch_shape, T, N, H, S, K, Hv = sh
    _checks.choice("causal_alignment", causal_alignment, ("top_left", "bottom_right"))
    scale, logits_soft_cap, window = options(H, scale, logits_soft_cap, local_window_size, T + S)
    dropout_rate = _checks.concrete_number("dropout_rate", dropout_rate, low=0, high=1, high_open=True)
    if dropout_rng is not None and dropout_rate > 0:
        _checks.shape_of("dropout_rng", dropout_rng)
    else:
        dropout_rate, dropout_rng = 0.0, None
    B = sh.B
    arrays = Arrays(
        query=jnp.reshape(query, (B, T, K, N // K, H)),  # [B, T, K, G, H]
        key=jnp.reshape(key, (B, S, K, H)),  # [B, S, K, H]
        value=jnp.reshape(value, (B, S, K, Hv)),  # [B, S, K, Hv]
        mask=_split_heads(mask, batch_shape, N, K, T, S),
        bias=_split_heads(bias, batch_shape, N, K, T, S),
        keep=None,
        q_lengths=_flat(query_seq_lengths, B),  # [B]
        kv_lengths=_flat(key_value_seq_lengths, B),  # [B]
        q_segment_ids=_flat(q_segment_ids, B, (T,)),  # [B, T]
        kv_segment_ids=_flat(kv_segment_ids, B, (S,)),  # [B, S]
    )
    config = Config(
        scale=scale,
        is_causal=bool(is_causal),
        offset=0 if causal_alignment == "top_left" else S - T,
        window=window,
        logits_soft_cap=logits_soft_cap,
        dropout_rate=dropout_rate,
        broadcast_dropout=bool(broadcast_dropout),
        block_sizes=check_block_sizes(block_sizes),
    )
    return AttentionSpec(batch_shape, T, N, S, Hv, config, arrays, dropout_rng, implementation,
                         bool(return_residual), bool(return_weights))
