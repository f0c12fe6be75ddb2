"""``dot_product_attention``: the functional API, a drop-in for ``jax.nn.dot_product_attention``.

Shape glossary: B batch (any number of leading dims), T query length, S key length, N query
heads, K key/value heads, H key head dim, Hv value head dim.

Reads top to bottom: check and normalise the arguments (``jattn.core.spec``), choose the
implementation (``jattn.dispatch``), run it over every head (``jattn.multihead``), give the
results the caller's shapes. The layers below know nothing of this one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jattn import dispatch, multihead
from jattn.core.spec import AttentionSpec, attention_spec


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

    Args:
      query: ``[*B, T, N, H]`` (``[T, N, H]`` unbatched), floating.
      key: ``[*B, S, K, H]``, the dtype of ``query``; N must be a multiple of K (GQA/MQA).
      value: ``[*B, S, K, Hv]``, the dtype of ``query``.
      bias: additive, broadcastable to ``[*B, N, T, S]``, added after the soft cap.
      mask: bool (True = attend), broadcastable to ``[*B, N, T, S]``.
      scale: multiplies ``q·kᵀ``; default ``1/sqrt(H)``.
      is_causal: query i sees keys ``<= i`` (aligned by ``causal_alignment``).
      query_seq_lengths: ``[*B]`` integers; query rows at or past the length return 0.
      key_value_seq_lengths: ``[*B]`` integers; keys at or past the length are hidden.
      local_window_size: ``w`` or ``(left, right)``: query i sees keys in ``[i - left, i + right]``
        around the same diagonal as ``is_causal``.
      implementation: None (the automatic choice, see ``explain_implementation``), ``'xla'``,
        ``'chunked'`` (memory-linear) or ``'cudnn'``.
      return_residual: also return the fp32 logsumexp ``[*B, T, N]`` (stop-gradient, as in jax.nn).
      causal_alignment: ``'top_left'`` (jax.nn's default: query i sees keys ``<= i``) or
        ``'bottom_right'`` (query i sees keys ``<= i + S - T``: the last query sees every key,
        as in KV-cache decoding).
      q_segment_ids: ``[*B, T]`` integers; a query attends only to keys of its own segment
        (packed sequences). Give both segment ids or neither.
      kv_segment_ids: ``[*B, S]`` integers.
      logits_soft_cap: ``c`` replaces the scaled scores by ``c·tanh(scores/c)`` (before bias).
      dropout_rate: dropout on the attention weights; active only with ``dropout_rng``.
      dropout_rng: a PRNG key.
      broadcast_dropout: one keep-mask ``[T, S]`` shared by all batch rows and heads (Flax's
        ``broadcast_dropout=True``); by default every (batch, head) draws its own.
      return_weights: also return the (pre-dropout) weights ``[*B, N, T, S]``, in fp32.
      block_sizes: ``(block_q, block_kv)`` tiles for ``implementation='chunked'``.

    Returns:
      ``out [*B, T, N, Hv]`` in the dtype of ``query``, or a tuple ``(out, residual?, weights?)``
      with the residual ``[*B, T, N]`` when ``return_residual`` and the weights
      ``[*B, N, T, S]`` when ``return_weights``.

    Semantics where jattn differs from jax.nn on purpose: a query row that can see no key
    (mask, ``-inf`` bias, lengths, window, segments) returns exactly 0 with zero gradients
    and residual ``-inf`` (jax.nn returns the mean of ``value``, or NaN for a ``-inf``
    bias). Logits, softmax and accumulation are fp32 (float64 for float64 inputs).
    """
    spec = attention_spec(
        query, key, value, bias, mask, scale=scale, is_causal=is_causal, query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths, local_window_size=local_window_size,
        implementation=implementation, return_residual=return_residual, causal_alignment=causal_alignment,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, logits_soft_cap=logits_soft_cap,
        dropout_rate=dropout_rate, dropout_rng=dropout_rng, broadcast_dropout=broadcast_dropout,
        return_weights=return_weights, block_sizes=block_sizes,
    )
    chosen = dispatch.resolve(spec.implementation, spec.config, spec.arrays, return_weights=spec.return_weights)
    out, lse, weights = _run(chosen, spec)
    return _results(spec, out, lse, weights)


def _run(chosen: str, spec: AttentionSpec):
    """multihead.run, with JAX's message for jvp of a custom_vjp turned into one that helps."""
    try:
        return multihead.run(chosen, spec.config, spec.arrays, spec.dropout_rng, spec.return_weights)
    except TypeError as e:
        if chosen != "chunked" or "forward-mode" not in str(e):
            raise
        how = "requested" if spec.implementation == "chunked" else "chosen automatically for long sequences"
        raise TypeError(
            f"implementation: 'chunked' ({how}) supports reverse-mode autodiff (grad, vjp) but not "
            f"forward-mode (jax.jvp, jax.jacfwd, jax.hessian); pass implementation='xla' for "
            f"forward-mode derivatives"
        ) from e


def _results(spec: AttentionSpec, out, lse, weights):
    """out [B, T, K, G, Hv] (+ lse, weights) -> the caller's shapes and tuple."""
    out = jnp.reshape(out, spec.batch_shape + (spec.T, spec.N, spec.Hv))  # [*B, T, N, Hv]
    extras = []
    if spec.return_residual:
        extras.append(jax.lax.stop_gradient(jnp.reshape(lse, spec.batch_shape + (spec.T, spec.N))))  # [*B, T, N]
    if spec.return_weights:
        extras.append(jnp.reshape(weights, spec.batch_shape + (spec.N, spec.T, spec.S)))  # [*B, N, T, S]
    return (out, *extras) if extras else out
