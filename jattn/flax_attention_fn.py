"""``attention_fn`` adapters: Flax's attention signature on jattn's attention functions.

Shape glossary: B batch (any number of leading dims), T query length, S key length,
N query heads, K kv heads (N = K·G), H head dim.

    nnx.MultiHeadAttention(..., attention_fn=jattn.flax_attention_fn)
    nn.MultiHeadDotProductAttention(..., attention_fn=jattn.flax_attention_fn)
    jattn.nnx.MultiHeadAttention(..., attention_fn=jattn.sequence_parallel_attention_fn(mesh=..., ...))

One adapter (``flax_attention_fn``: dtype casts, Flax's float masks, dropout resolution, sow)
serves both; ``sequence_parallel_attention_fn`` binds it to ``sequence_parallel_attention``.

Differences from Flax's ``dot_product_attention`` (on purpose):
  * a query row that sees no key returns 0 (Flax: the mean of ``value``);
  * softmax and accumulation are always fp32 (``precision`` is accepted and not needed);
  * dropout with ``broadcast_dropout=True`` shares one [T, S] keep-mask over batch and
    heads, as in Flax, but the random draws differ from Flax's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax.numpy as jnp
from jax.sharding import Mesh

from jattn.core import _checks
from jattn.functional import dot_product_attention
from jattn.parallel.ring import LAYOUTS
from jattn.parallel.sequence_parallel import STRATEGIES, sequence_parallel_attention


def _sow(module, weights) -> None:
    """Store the weights where Flax's own attention would: NNX Intermediate or Linen intermediates."""
    from flax import nnx  # late import: jattn itself does not need flax

    if isinstance(module, nnx.Module):
        module.sow(nnx.Intermediate, "attention_weights", weights)
    else:
        module.sow("intermediates", "attention_weights", weights)


def flax_attention_fn(
    query,
    key,
    value,
    bias=None,
    mask=None,
    broadcast_dropout: bool = True,
    dropout_rng=None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype=None,
    precision=None,
    module=None,
    is_causal: bool = False,
    *,
    implementation: str | None = None,
    logits_soft_cap: float | None = None,
    attention: Callable = dot_product_attention,
):
    """Flax's ``dot_product_attention`` signature on top of ``jattn.dot_product_attention``.

    Args:
      query: ``[*B, T, N, H]``.
      key: ``[*B, S, K, H]`` (K divides N).
      value: ``[*B, S, K, Hv]``.
      bias: additive, broadcastable to ``[*B, N, T, S]``.
      mask: bool or Flax's float 0/1 mask, broadcastable to ``[*B, N, T, S]``.
      broadcast_dropout: one ``[T, S]`` keep-mask for every batch row and head.
      dropout_rng: PRNG key; needed when dropout runs.
      dropout_rate: dropout on the weights; runs when > 0 and ``deterministic`` is False.
      deterministic: no dropout.
      dtype: the computation dtype; default the inputs' result type.
      precision: accepted for Flax's signature and not needed (softmax is always fp32).
      module: a Flax module; when set, the (pre-dropout) weights ``[*B, N, T, S]`` in the
        computation dtype are sown as ``attention_weights``.
      is_causal: causal masking (top-left), as in ``dot_product_attention``.
      implementation: passed to the core.
      logits_soft_cap: passed to the core.
      attention: the function that computes attention, called as ``attention(query, key,
        value, bias, mask, is_causal=, implementation=, logits_soft_cap=, dropout_rate=,
        dropout_rng=, broadcast_dropout=, return_weights=)`` with
        ``jattn.dot_product_attention``'s meaning; bind another one with
        ``functools.partial`` to reuse this adapter (dtype casts, Flax's float masks, dropout
        resolution, sow) for another core, e.g. a sequence-parallel one.

    Returns:
      ``[*B, T, N, Hv]`` in the computation dtype.
    """
    del precision  # see the module docstring
    dtype = dtype or jnp.result_type(query, key, value)
    query, key, value = (jnp.asarray(x, dtype) for x in (query, key, value))
    if mask is not None and jnp.result_type(mask) != jnp.bool_:
        mask = jnp.asarray(mask) != 0  # Flax's make_attention_mask gives float 0/1 masks
    dropping = not deterministic and dropout_rate > 0.0
    if dropping and dropout_rng is None:
        raise ValueError(
            f"dropout_rng: expected a PRNG key when dropout_rate={dropout_rate} > 0 and "
            "deterministic=False, got None"
        )
    result = attention(
        query, key, value, bias, mask,
        is_causal=is_causal,
        implementation=implementation,
        logits_soft_cap=logits_soft_cap,
        dropout_rate=dropout_rate if dropping else 0.0,
        dropout_rng=dropout_rng if dropping else None,
        broadcast_dropout=broadcast_dropout,
        return_weights=module is not None,
    )
    if module is None:
        return result
    out, weights = result
    _sow(module, weights.astype(dtype))
    return out


def _sequence_parallel_core(query, key, value, bias, mask, *, is_causal, implementation, logits_soft_cap,
                            dropout_rate, dropout_rng, broadcast_dropout, return_weights, **sharding):
    """``flax_attention_fn``'s ``attention`` on ``sequence_parallel_attention`` (``sharding``: mesh,
    axis_name, batch_axis, head_axis, layout, strategy); what the ring cannot do raises."""
    del dropout_rng, broadcast_dropout  # dropout_rate > 0 raises below
    unsupported = (  # (argument, is it used, what was given, why it cannot be)
        ("mask", mask is not None, "an array", "ring attention takes is_causal, no dense mask; decode unsharded"),
        ("bias", bias is not None, "an array", "ring attention takes no dense bias"),
        ("dropout_rate", dropout_rate > 0.0, dropout_rate, "no attention dropout"),
        ("module", return_weights, "a module (sow_weights=True)", "the [T, S] weights are never formed"),
        ("implementation", implementation is not None, repr(implementation), "the ring computes its tiles"),
    )
    for name, used, got, why in unsupported:
        if used:
            raise ValueError(
                f"{name}: not supported by sequence_parallel_attention_fn ({why}); expected None "
                f"(0 for dropout_rate), got {got}"
            )
    return sequence_parallel_attention(query, key, value, is_causal=is_causal, logits_soft_cap=logits_soft_cap,
                                       **sharding)


def sequence_parallel_attention_fn(
    *,
    mesh: Mesh,
    axis_name: str,
    batch_axis: str | None = None,
    head_axis: str | None = None,
    layout: str = "contiguous",
    strategy: str = "ring",
) -> Callable:
    """An ``attention_fn`` for ``jattn.nnx.MultiHeadAttention`` (or any caller of the
    ``jattn.flax_attention_fn`` signature) that runs ``jattn.sequence_parallel_attention``.

        attn = jattn.nnx.MultiHeadAttention(..., attention_fn=jattn.sequence_parallel_attention_fn(
            mesh=mesh, axis_name="sequence", batch_axis="data", layout="zigzag"))

    For training and full-sequence forward passes: ``is_causal`` and ``logits_soft_cap`` are
    honoured; a dense ``mask`` or ``bias``, attention dropout, ``sow_weights`` and an
    ``implementation`` raise ValueError. That includes KV-cache decoding (its step mask is
    dense): decode with a module built on the default ``jattn.flax_attention_fn`` (the
    parameters are the same).

    Args:
      mesh: the ``jax.sharding.Mesh``.
      axis_name: the mesh axis the sequence is sharded over.
      batch_axis, head_axis: mesh axes for the batch and the heads, or None.
      layout: ``'contiguous'`` or ``'zigzag'``; for ``'zigzag'`` the caller permutes the
        sequence (``jattn.parallel.ring.to_layout``) and the RoPE positions
        (``jattn.parallel.ring.layout_positions``).
      strategy: as in ``jattn.sequence_parallel_attention``.

    Returns:
      ``flax_attention_fn`` bound to ``sequence_parallel_attention`` on that mesh.
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh: expected a jax.sharding.Mesh (e.g. from jax.make_mesh), got {type(mesh).__name__}")
    for name, axis in (("axis_name", axis_name), ("batch_axis", batch_axis), ("head_axis", head_axis)):
        if (axis is not None or name == "axis_name") and axis not in mesh.axis_names:
            raise ValueError(f"{name}: expected one of the mesh axes {tuple(mesh.axis_names)}, got {axis!r}")
    _checks.choice("layout", layout, LAYOUTS)
    _checks.choice("strategy", strategy, STRATEGIES)
    core = functools.partial(_sequence_parallel_core, mesh=mesh, axis_name=axis_name, batch_axis=batch_axis,
                             head_axis=head_axis, layout=layout, strategy=strategy)
    return functools.partial(flax_attention_fn, attention=core)
