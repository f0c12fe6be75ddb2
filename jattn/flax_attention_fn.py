"""``attention_fn`` for Flax's own attention modules, running on jattn.

Shape glossary: B batch (any number of leading dims), T query length, S key length,
N query heads, K kv heads (N = K·G), H head dim.

    nnx.MultiHeadAttention(..., attention_fn=jattn.flax_attention_fn)
    nn.MultiHeadDotProductAttention(..., attention_fn=jattn.flax_attention_fn)

Differences from Flax's ``dot_product_attention`` (on purpose):
  * a query row that sees no key returns 0 (Flax: the mean of ``value``);
  * softmax and accumulation are always fp32 (``precision`` is accepted and not needed);
  * dropout with ``broadcast_dropout=True`` shares one [T, S] keep-mask over batch and
    heads, as in Flax, but the random draws differ from Flax's.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from jattn.functional import dot_product_attention


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

    ``query [*B, T, N, H]``, ``key [*B, S, K, H]``, ``value [*B, S, K, Hv]`` (K divides N);
    ``mask`` (bool, or Flax's float 0/1 masks) and ``bias`` broadcast to ``[*B, N, T, S]``.
    Dropout runs when ``dropout_rate > 0``, ``deterministic`` is False and ``dropout_rng`` is
    given. With ``module`` set, the (pre-dropout) weights ``[*B, N, T, S]`` in the computation
    dtype are sown as ``attention_weights``. ``implementation`` and ``logits_soft_cap`` are
    passed to the core.

    ``attention`` is the function that computes attention, called as
    ``attention(query, key, value, bias, mask, is_causal=, implementation=, logits_soft_cap=,
    dropout_rate=, dropout_rng=, broadcast_dropout=, return_weights=)`` with
    ``jattn.dot_product_attention``'s meaning; bind another one with ``functools.partial`` to
    reuse this adapter (dtype casts, Flax's float masks, dropout resolution, sow) for another
    core, e.g. a sequence-parallel one.

    Returns ``[*B, T, N, Hv]``.
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
