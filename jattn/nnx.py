"""``jattn.nnx.MultiHeadAttention``: a drop-in for ``flax.nnx.MultiHeadAttention`` on jattn.

Shape glossary: B batch (any number of leading dims), T query length, S key length,
L cache capacity, F input features, N query heads, K kv heads, H head dim.

Parameters are Flax's, with the same names and shapes: ``query.kernel [F, N, H]``,
``key/value.kernel [F, K, H]``, biases ``[N|K, H]``, ``out.kernel [N, H, F_out]``,
``out.bias [F_out]``, and ``query_ln/key_ln.scale [H]`` with ``normalize_qk``. So
``nnx.update(ours, nnx.state(flax_layer, nnx.Param))`` ports a Flax layer unchanged.

Decoding (``decode=True`` after ``init_cache``) appends any number of new tokens per call,
with per-row lengths for right-padded ragged prompts (see ``jattn._kv_cache``); with
``is_causal=True`` the causal mask is aligned to each row's cache position.

Decoding misuse is never silent: eagerly, a call that would write past the cache or has
``lengths`` outside ``[0, T]`` raises ``ValueError``; under ``jit`` (where the values are not
known while tracing) the row is poisoned instead -- its outputs are NaN, nothing is written,
and its ``cache_index`` becomes -1 for every later call until ``init_cache``. Check
``jnp.any(cache_index < 0)`` after a jitted decode loop (see ``jattn._kv_cache``).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import jax.numpy as jnp

try:
    from flax import nnx
except ModuleNotFoundError as err:  # Flax is the `flax` extra, not a core dependency
    raise ModuleNotFoundError(f"jattn.nnx needs Flax: pip install 'jattn[flax]' ({err})") from err

from flax.nnx.nn import dtypes, initializers
from flax.nnx.nn.linear import default_kernel_init

from jattn import _kv_cache, _module_core
from jattn.core import _checks
from jattn.kernels import paged
from jattn.flax_attention_fn import flax_attention_fn

_EMPTY: Mapping[str, Any] = MappingProxyType({})


class MultiHeadAttention(nnx.Module):
    """Multi-head attention with Flax NNX's constructor, call and parameters, computed by jattn.

    Arguments as in ``flax.nnx.MultiHeadAttention`` (``num_heads, in_features, qkv_features,
    out_features, num_kv_heads, in_kv_features, dtype, param_dtype, broadcast_dropout,
    dropout_rate, deterministic, precision, kernel_init, out_kernel_init, bias_init,
    out_bias_init, use_bias, decode, normalize_qk, *_promote_dtype, rngs, keep_rngs,
    *_metadata``, ``attention_fn``), except the deprecated ``*_dot_general*`` hooks.
    ``decode=None`` means False.

    ``attention_fn`` (default ``jattn.flax_attention_fn``) is called as Flax calls it
    (``query, key, value, mask=, dropout_rng=, dropout_rate=, broadcast_dropout=,
    deterministic=, dtype=, precision=, module=, is_causal=``) plus the keywords
    ``implementation=`` and ``logits_soft_cap=`` below; e.g.
    ``jattn.sequence_parallel_attention_fn(...)`` runs ring attention over a mesh axis.

    Args:
      num_heads: N, as in Flax (and every other Flax argument above).
      num_kv_heads: K kv heads (GQA/MQA), a divisor of N; default N.
      implementation: passed to ``jattn.dot_product_attention`` (None = automatic).
      logits_soft_cap: ``c·tanh(scores/c)`` on the attention scores.
      rope_base: if set, rotary position embedding with this base is applied to the projected
        queries and keys (after ``normalize_qk``, before caching). Positions default to
        ``0..T-1`` / ``0..S-1``, and to each row's cache position in decode mode.
      attention_fn: see above.
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        qkv_features: int | None = None,
        out_features: int | None = None,
        num_kv_heads: int | None = None,
        in_kv_features: int | None = None,
        *,
        dtype=None,
        param_dtype=jnp.float32,
        broadcast_dropout: bool = True,
        dropout_rate: float = 0.0,
        deterministic: bool | None = None,
        precision=None,
        kernel_init=default_kernel_init,
        out_kernel_init=None,
        bias_init=initializers.zeros_init(),
        out_bias_init=None,
        use_bias: bool = True,
        decode: bool | None = None,
        normalize_qk: bool = False,
        qkv_promote_dtype=dtypes.promote_dtype,
        out_promote_dtype=dtypes.promote_dtype,
        ln_promote_dtype=dtypes.promote_dtype,
        rngs: nnx.Rngs,
        keep_rngs: bool = True,
        kernel_metadata: Mapping[str, Any] = _EMPTY,
        out_kernel_metadata: Mapping[str, Any] = _EMPTY,
        bias_metadata: Mapping[str, Any] = _EMPTY,
        out_bias_metadata: Mapping[str, Any] = _EMPTY,
        query_ln_scale_metadata: Mapping[str, Any] = _EMPTY,
        key_ln_scale_metadata: Mapping[str, Any] = _EMPTY,
        implementation: str | None = None,
        logits_soft_cap: float | None = None,
        rope_base: float | None = None,
        attention_fn=flax_attention_fn,
    ):
        self.num_heads = num_heads
        self.in_features = in_features
        self.qkv_features = qkv_features if qkv_features is not None else in_features
        self.out_features = out_features if out_features is not None else in_features
        self.in_kv_features = in_kv_features if in_kv_features is not None else in_features
        _, self.num_kv_heads, self.head_dim = _module_core.head_dims(
            num_heads, num_kv_heads, self.qkv_features, rope_base
        )
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.broadcast_dropout = broadcast_dropout
        self.dropout_rate = _checks.concrete_number("dropout_rate", dropout_rate, low=0, high=1, high_open=True)
        self.deterministic = deterministic
        self.precision = precision
        self.use_bias = use_bias
        self.decode = decode
        self.normalize_qk = normalize_qk
        self.implementation = implementation
        self.logits_soft_cap = logits_soft_cap
        self.rope_base = rope_base
        self.attention_fn = attention_fn

        def projection(in_features, heads):
            return nnx.LinearGeneral(
                in_features, (heads, self.head_dim),
                dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, bias_init=bias_init,
                use_bias=use_bias, precision=precision, promote_dtype=qkv_promote_dtype,
                kernel_metadata=kernel_metadata, bias_metadata=bias_metadata, rngs=rngs,
            )

        self.query = projection(self.in_features, num_heads)  # [*B, T, F] -> [*B, T, N, H]
        self.key = projection(self.in_kv_features, self.num_kv_heads)  # [*B, S, F] -> [*B, S, K, H]
        self.value = projection(self.in_kv_features, self.num_kv_heads)  # [*B, S, F] -> [*B, S, K, H]
        if normalize_qk:
            def norm(metadata):
                return nnx.LayerNorm(
                    self.head_dim, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                    promote_dtype=ln_promote_dtype, scale_metadata=metadata, rngs=rngs,
                )
            self.query_ln = norm(query_ln_scale_metadata)
            self.key_ln = norm(key_ln_scale_metadata)
        else:
            self.query_ln = nnx.data(None)
            self.key_ln = nnx.data(None)
        self.out = nnx.LinearGeneral(  # [*B, T, N, H] -> [*B, T, F_out]
            (num_heads, self.head_dim), self.out_features, axis=(-2, -1),
            dtype=dtype, param_dtype=param_dtype,
            kernel_init=out_kernel_init or kernel_init, bias_init=out_bias_init or bias_init,
            use_bias=use_bias, precision=precision, promote_dtype=out_promote_dtype,
            kernel_metadata=out_kernel_metadata or kernel_metadata,
            bias_metadata=out_bias_metadata or bias_metadata, rngs=rngs,
        )
        self.rngs = rngs.dropout.fork() if keep_rngs and self.dropout_rate > 0 else nnx.data(None)
        self.cached_key = nnx.data(None)
        self.cached_value = nnx.data(None)
        self.cache_index = nnx.data(None)
        self.paged_cache = nnx.data(None)

    def init_paged_cache(self, num_pages: int, page_size: int, *, batch_size: int,
                         max_pages_per_sequence: int, dtype=jnp.float32) -> None:
        """Decode over a paged KV cache (``jattn.kernels.paged``) instead of the fixed one.

        ``paged_cache`` holds a ``PagedKVCache`` with ``batch_size`` sequence slots; each decode
        call (``is_causal=True``, no mask or lengths) reserves pages, appends its T tokens and
        attends over the pages. Free a finished slot with
        ``m.paged_cache.set_value(jattn.kernels.paged.free(m.paged_cache.get_value(), rows))``.
        """
        self.paged_cache = nnx.Cache(paged.init(
            num_pages, page_size, self.num_kv_heads, self.head_dim, batch_size=batch_size,
            max_pages_per_sequence=max_pages_per_sequence, dtype=dtype,
        ))

    def init_cache(self, input_shape, dtype=jnp.float32) -> None:
        """Allocate an empty cache for inputs of shape ``[*B, max_length, F]``.

        Creates ``cached_key``/``cached_value`` ``[*B, max_length, K, H]`` of ``dtype`` and
        ``cache_index [*B]`` (int32 zeros: tokens held per row).
        """
        input_shape = _kv_cache.input_shape(input_shape, (self.in_features, self.in_kv_features))
        shape = input_shape[:-1] + (self.num_kv_heads, self.head_dim)  # [*B, L, K, H]
        _checks.floating("dtype", jnp.zeros((), dtype))
        self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
        self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))
        self.cache_index = nnx.Cache(jnp.zeros(shape[:-3], jnp.int32))

    def _dropout_rng(self, deterministic, rngs):
        """A dropout key when dropout runs in this call, else None."""
        deterministic = deterministic if deterministic is not None else self.deterministic
        if not _module_core.dropout_active(self.dropout_rate, deterministic):
            return None
        stream = rngs if rngs is not None else self.rngs
        if isinstance(stream, nnx.Rngs):
            stream = stream.dropout
        if stream is None:
            raise ValueError("rngs: expected nnx.Rngs for dropout (keep_rngs=False), got None")
        return stream()

    def __call__(
        self,
        inputs_q,
        inputs_k=None,
        inputs_v=None,
        *,
        mask=None,
        deterministic: bool | None = None,
        rngs=None,
        sow_weights: bool = False,
        decode: bool | None = None,
        is_causal: bool = False,
        lengths=None,
        positions=None,
        kv_positions=None,
    ):
        """Attention of ``inputs_q`` over ``inputs_k``/``inputs_v``, as in Flax.

        Decode mode (``S = L`` is the cache): the T new tokens are appended at each row's
        ``cache_index``.

        Args:
          inputs_q: ``[*B, T, F]``.
          inputs_k: ``[*B, S, F_kv]``; default ``inputs_q``.
          inputs_v: ``[*B, S, F_kv]``; default ``inputs_k``.
          mask: bool (True = attend), broadcastable to ``[*B, N, T, S]`` (``[*B, N, T, L]`` in
            decode mode).
          deterministic: overrides the constructor's (no dropout when True).
          rngs: ``nnx.Rngs`` for dropout; overrides the constructor's.
          sow_weights: store the weights ``[*B, N, T, S]`` as ``nnx.Intermediate``
            ``attention_weights``.
          decode: overrides the constructor's.
          is_causal: causal masking; in decode mode new token t of row b sees cache slots
            ``<= cache_index[b] + t`` (``False``: every valid slot).
          lengths: decode mode only: ``[*B]`` valid new tokens per row (right padding;
            default T).
          positions: ``[*B, T]`` RoPE positions of the queries (with ``rope_base``).
          kv_positions: ``[*B, S]`` RoPE positions of the keys.

        Returns:
          ``[*B, T, F_out]`` (padded tokens' outputs are meaningless).
        """
        inputs_q, inputs_k, inputs_v = _module_core.module_inputs(
            inputs_q, inputs_k, inputs_v, (self.in_features, self.in_kv_features)
        )
        decode = bool(decode if decode is not None else self.decode)
        _module_core.check_lengths_use(lengths, decode)
        cache = None
        if decode and self.paged_cache is not None:
            query, key, value = self.query(inputs_q), self.key(inputs_k), self.value(inputs_v)
            if self.normalize_qk:
                query, key = self.query_ln(query), self.key_ln(key)
            x, new_cache = _module_core.attend_paged(
                query, key, value, self.paged_cache.get_value(), mask=mask, lengths=lengths, is_causal=is_causal,
                positions=positions, kv_positions=kv_positions, rope_base=self.rope_base,
                logits_soft_cap=self.logits_soft_cap,
            )  # [B, T, N, H]
            self.paged_cache.set_value(new_cache)
            return self.out(x)  # [B, T, F_out]
        if decode:
            if self.cached_key is None:
                raise ValueError("decode: the KV cache is not initialised; call init_cache(input_shape, dtype) first")
            cache = _kv_cache.Cache(self.cached_key[...], self.cached_value[...], self.cache_index[...])

        query = self.query(inputs_q)  # [*B, T, N, H]
        key = self.key(inputs_k)  # [*B, S, K, H]
        value = self.value(inputs_v)  # [*B, S, K, H]
        if self.normalize_qk:
            query = self.query_ln(query)
            key = self.key_ln(key)

        x, cache = _module_core.attend(
            query, key, value, attention_fn=self.attention_fn, cache=cache, mask=mask, lengths=lengths,
            is_causal=is_causal, positions=positions, kv_positions=kv_positions, rope_base=self.rope_base,
            dropout_rng=self._dropout_rng(deterministic, rngs), dropout_rate=self.dropout_rate,
            broadcast_dropout=self.broadcast_dropout, dtype=self.dtype, precision=self.precision,
            sow_into=self if sow_weights else None, implementation=self.implementation,
            logits_soft_cap=self.logits_soft_cap,
        )  # [*B, T, N, H]
        if cache is not None:
            self.cached_key[...], self.cached_value[...], self.cache_index[...] = cache
        return self.out(x)  # [*B, T, F_out]
