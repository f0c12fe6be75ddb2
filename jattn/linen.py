"""``jattn.linen.MultiHeadAttention``: a drop-in for ``flax.linen.MultiHeadDotProductAttention``.

Shape glossary: B batch (any number of leading dims), T query length, S key length,
L cache capacity, F input features, N query heads, K kv heads, H head dim.

The params dict is Flax's: ``query/key/value/out`` with ``kernel`` (``[F, N|K, H]``;
out ``[N, H, F_out]``) and ``bias``, plus ``query_ln/key_ln`` ``scale`` with ``normalize_qk``;
so ``flax_module.init(...)['params']`` applies to this module unchanged. With ``num_kv_heads``
(GQA/MQA, not in Flax's Linen module) the key/value kernels are ``[F, K, H]``.

Decoding: the ``'cache'`` collection holds ``cached_key/cached_value [*B, L, K, H]`` and
``cache_index [*B]`` (per-row lengths, right-padded ragged prompts; see ``jattn._kv_cache``).
Create it as in Flax, ``model.init(key, x_of_shape_[*B, L, F])`` with ``decode=True``, or
with ``model.init(key, (B, L, F), method=model.init_cache)``; then
``model.apply({'params': p, 'cache': c}, x, mutable=['cache'])`` appends ``x``'s tokens.

Decoding misuse is never silent: eagerly, a call that would write past the cache or has
``lengths`` outside ``[0, T]`` raises ``ValueError``; under ``jit`` (where the values are not
known while tracing) the row is poisoned instead -- its outputs are NaN, nothing is written,
and its ``cache_index`` becomes -1 for every later call until ``init_cache``. Check
``jnp.any(cache_index < 0)`` after a jitted decode loop (see ``jattn._kv_cache``).
"""

from __future__ import annotations

from collections.abc import Callable

try:
    import flax.linen as nn
except ModuleNotFoundError as err:  # Flax is the `flax` extra, not a core dependency
    raise ModuleNotFoundError(f"jattn.linen needs Flax: pip install 'jattn[flax]' ({err})") from err
import jax.numpy as jnp
from flax.linen import initializers
from flax.linen.linear import default_kernel_init
from flax.linen.module import merge_param

from jattn import _kv_cache, _module_core
from jattn.core import _checks
from jattn.kernels import paged
from jattn.flax_attention_fn import flax_attention_fn


class MultiHeadAttention(nn.Module):
    """Multi-head attention with Flax Linen's attributes, call and params, computed by jattn.

    Attributes as in ``flax.linen.MultiHeadDotProductAttention`` (``num_heads, dtype,
    param_dtype, qkv_features, out_features, broadcast_dropout, dropout_rate, deterministic,
    precision, kernel_init, out_kernel_init, bias_init, out_bias_init, use_bias, decode,
    normalize_qk, attention_fn``), except ``force_fp32_for_softmax`` (jattn's softmax is always
    fp32) and the deprecated dot_general/einsum hooks. ``attention_fn`` defaults to
    ``jattn.flax_attention_fn`` and is called as Flax calls it, plus ``implementation=`` and
    ``logits_soft_cap=``.

    Attributes:
      num_heads: N, as in Flax (and every other Flax attribute above).
      num_kv_heads: K kv heads (GQA/MQA), a divisor of N; default N.
      implementation: passed to ``jattn.dot_product_attention`` (None = automatic).
      logits_soft_cap: ``c·tanh(scores/c)`` on the attention scores.
      rope_base: if set, rotary embedding of the projected queries and keys with this base
        (after ``normalize_qk``, before caching).
    """

    num_heads: int
    dtype: object = None
    param_dtype: object = jnp.float32
    qkv_features: int | None = None
    out_features: int | None = None
    broadcast_dropout: bool = True
    dropout_rate: float = 0.0
    deterministic: bool | None = None
    precision: object = None
    kernel_init: object = default_kernel_init
    out_kernel_init: object = None
    bias_init: object = initializers.zeros_init()
    out_bias_init: object = None
    use_bias: bool = True
    decode: bool = False
    normalize_qk: bool = False
    attention_fn: Callable = flax_attention_fn
    num_kv_heads: int | None = None
    implementation: str | None = None
    logits_soft_cap: float | None = None
    rope_base: float | None = None

    def _heads(self, features: int) -> tuple[int, int, int]:
        """(N, K, H) for inputs with ``features`` channels, or a ValueError."""
        qkv = self.qkv_features if self.qkv_features is not None else features
        return _module_core.head_dims(self.num_heads, self.num_kv_heads, qkv, self.rope_base)

    def init_cache(self, input_shape, dtype=jnp.float32) -> None:
        """Put an empty cache for inputs ``[*B, max_length, F]`` in the ``'cache'`` collection."""
        input_shape = _kv_cache.input_shape(input_shape)
        _, K, H = self._heads(input_shape[-1])
        shape = input_shape[:-1] + (K, H)  # [*B, L, K, H]
        _checks.floating("dtype", jnp.zeros((), dtype))
        self.put_variable("cache", "cached_key", jnp.zeros(shape, dtype))
        self.put_variable("cache", "cached_value", jnp.zeros(shape, dtype))
        self.put_variable("cache", "cache_index", jnp.zeros(shape[:-3], jnp.int32))

    def init_paged_cache(self, features: int, num_pages: int, page_size: int, *, batch_size: int,
                         max_pages_per_sequence: int, dtype=jnp.float32) -> None:
        """Put an empty paged KV cache (``jattn.kernels.paged``) for inputs with ``features`` channels in
        the ``'cache'`` collection as ``paged_cache``; decode calls (``is_causal=True``, no mask
        or lengths) then reserve pages, append and attend over the pages."""
        _, K, H = self._heads(features)
        self.put_variable("cache", "paged_cache", paged.init(
            num_pages, page_size, K, H, batch_size=batch_size,
            max_pages_per_sequence=max_pages_per_sequence, dtype=dtype,
        ))

    @nn.compact
    def __call__(
        self,
        inputs_q,
        inputs_k=None,
        inputs_v=None,
        *,
        mask=None,
        deterministic: bool | None = None,
        dropout_rng=None,
        sow_weights: bool = False,
        decode: bool | None = None,
        is_causal: bool = False,
        lengths=None,
        positions=None,
        kv_positions=None,
    ):
        """Attention of ``inputs_q`` over ``inputs_k``/``inputs_v``, as in Flax.

        Args:
          inputs_q: ``[*B, T, F]``.
          inputs_k: ``[*B, S, F_kv]``; default ``inputs_q``.
          inputs_v: ``[*B, S, F_kv]``; default ``inputs_k``.
          mask: bool (True = attend), broadcastable to ``[*B, N, T, S]``.
          deterministic: overrides the attribute (no dropout when True).
          dropout_rng: PRNG key for dropout; default ``make_rng('dropout')``.
          sow_weights: sow ``attention_weights [*B, N, T, S]`` into ``'intermediates'``.
          decode: overrides the attribute.
          is_causal: causal masking (in decode mode as in ``jattn.nnx.MultiHeadAttention``).
          lengths: decode mode only: ``[*B]`` valid new tokens per row (right padding).
          positions: ``[*B, T]`` RoPE positions of the queries (with ``rope_base``).
          kv_positions: ``[*B, S]`` RoPE positions of the keys.

        Returns:
          ``[*B, T, F_out]``.
        """
        inputs_q, inputs_k, inputs_v = _module_core.module_inputs(inputs_q, inputs_k, inputs_v)
        N, K, H = self._heads(inputs_q.shape[-1])
        decode = self.decode if decode is None else decode
        _module_core.check_lengths_use(lengths, decode)

        def dense(heads, name):
            return nn.DenseGeneral(
                features=(heads, H), axis=-1, dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=self.kernel_init, bias_init=self.bias_init, use_bias=self.use_bias,
                precision=self.precision, name=name,
            )

        query = dense(N, "query")(inputs_q)  # [*B, T, N, H]
        key = dense(K, "key")(inputs_k)  # [*B, S, K, H]
        value = dense(K, "value")(inputs_v)  # [*B, S, K, H]
        if self.normalize_qk:
            def norm(name):
                return nn.LayerNorm(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
            query = norm("query_ln")(query)
            key = norm("key_ln")(key)

        def out(x):  # [*B, T, N, H] -> [*B, T, F_out]
            return nn.DenseGeneral(
                features=self.out_features or inputs_q.shape[-1], axis=(-2, -1),
                kernel_init=self.out_kernel_init or self.kernel_init,
                bias_init=self.out_bias_init or self.bias_init, use_bias=self.use_bias,
                dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision, name="out",
            )(x)

        if decode and self.has_variable("cache", "paged_cache"):
            x, paged_cache = _module_core.attend_paged(
                query, key, value, self.get_variable("cache", "paged_cache"), mask=mask, lengths=lengths,
                is_causal=is_causal, positions=positions, kv_positions=kv_positions,
                rope_base=self.rope_base, logits_soft_cap=self.logits_soft_cap,
            )  # [B, T, N, H]
            self.put_variable("cache", "paged_cache", paged_cache)
            return out(x)

        cache = None
        if decode and self.has_variable("cache", "cached_key"):
            names = ("cached_key", "cached_value", "cache_index")
            cache = _kv_cache.Cache(*(self.get_variable("cache", n) for n in names))
        elif decode and not self.is_initializing():
            raise ValueError(
                "decode: the KV cache is not initialised; call init (with decode=True) or "
                "init_cache(input_shape, dtype) first and pass the 'cache' collection"
            )
        elif decode:  # Flax's pattern: init with full-length inputs allocates the cache
            self.init_cache(inputs_k.shape[:-1] + inputs_q.shape[-1:], key.dtype)

        dropout = self.dropout_rate > 0.0 and _module_core.dropout_active(
            self.dropout_rate, merge_param("deterministic", self.deterministic, deterministic)
        )
        if dropout and dropout_rng is None:
            dropout_rng = self.make_rng("dropout")
        x, cache = _module_core.attend(
            query, key, value, attention_fn=self.attention_fn, cache=cache, mask=mask, lengths=lengths,
            is_causal=is_causal, positions=positions, kv_positions=kv_positions, rope_base=self.rope_base,
            dropout_rng=dropout_rng if dropout else None, dropout_rate=self.dropout_rate,
            broadcast_dropout=self.broadcast_dropout, dtype=self.dtype, precision=self.precision,
            sow_into=self if sow_weights else None, implementation=self.implementation,
            logits_soft_cap=self.logits_soft_cap,
        )  # [*B, T, N, H]
        if cache is not None:
            for name, array in zip(("cached_key", "cached_value", "cache_index"), cache):
                self.put_variable("cache", name, array)
        return out(x)
