"""Non-finite rows of q, k, v: multiplied as zeros, turned back into NaN where they are seen.

Shape glossary: L rows, d features, T/S query/key rows of a tile or a whole head.

A matmul multiplies a hidden entry's weight 0 by the row it hides, and 0 · NaN = NaN: a NaN
(or inf) in a hidden key or value would leak into rows that never see it, into some rows but
not others depending on how 'chunked' tiles the keys. Every path ('xla', the flex loop of
'chunked' and ``flex_attention``, ring attention's tiles) therefore multiplies only finite
entries (``zeroed``) and puts NaN back exactly where a row sees a non-finite row
(``nan_rows``, ``nan_seen``): in the logits or softmax sums for queries and keys, in the
output rows for values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def nan_rows(x: jax.Array, dtype) -> jax.Array:
    """x [..., d] -> [...] of ``dtype``: NaN where the row holds a NaN or inf, else 0 (no gradient).

    Flags are found and combined with boolean ``any`` and float sums, never max-reductions:
    XLA:CPU's max-reduce (jax 0.10.2) drops NaN from 16 rows on. A float sum of x · 0 (no
    boolean copy, 1.9 vs 2.2 ms standalone at [8192, 8, 64]) became a YNNPACK reduction of
    139 ms inside the flex backward's program (T = 8192, N = 8, H = 64): the flags stay ``any``.
    Nor a matrix-vector product with zeros (finite · 0 = 0, NaN or inf · 0 = NaN; 0.66 vs 1.07
    ms standalone): inside the flex forward XLA:CPU gave the reshaped q a layout the loop does
    not take and copied it whole (compiled temp 20.4 -> 34.5 MiB at T = 8192).
    """
    return nan_at(jnp.any(~jnp.isfinite(x), axis=-1), dtype)  # [...]


def zeroed(x: jax.Array) -> jax.Array:
    """x with every NaN or inf entry set to 0 (its row is flagged by ``nan_rows``)."""
    return jnp.where(jnp.isfinite(x), x, jnp.zeros((), x.dtype))


def nan_at(bad: jax.Array, dtype) -> jax.Array:
    """bad [L] bool -> [L] of ``dtype``: NaN where bad, else 0 (add it to poison those rows)."""
    return jnp.where(bad, jnp.asarray(jnp.nan, dtype), jnp.asarray(0, dtype))


def nan_seen(key_nan: jax.Array, visible: jax.Array | None, T: int) -> jax.Array:
    """key_nan [S] (NaN or 0, see ``nan_rows``), visible [T, S] or None (all) -> [T]: NaN in
    the rows that see a NaN entry, else 0. One boolean reduction that XLA fuses with the mask."""
    if visible is None:
        return jnp.broadcast_to(jnp.sum(key_nan), (T,))
    return nan_at(jnp.any(visible & jnp.isnan(key_nan)[None, :], axis=-1), key_nan.dtype)  # [T]


def nan_seen_prefix(key_nan: jax.Array, last: jax.Array) -> jax.Array:
    """key_nan [S] (NaN or 0), last [T] int -> [T]: NaN in the rows t that see a NaN among keys
    0..last[t] (a causal row), else 0. A running sum over S: no [T, S] pass."""
    if key_nan.shape[0] == 0:
        return jnp.zeros(last.shape, key_nan.dtype)
    running = jnp.cumsum(key_nan)  # [S]; 0 until the first NaN, NaN from there
    seen = running[jnp.clip(last, 0, key_nan.shape[0] - 1)]  # [T]
    return jnp.where(last >= 0, seen, 0)


def with_nan_rows(out: jax.Array, lse: jax.Array) -> jax.Array:
    """out [T, d_v], lse [T] -> out with NaN in every row whose logsumexp is NaN.

    A row's logsumexp is NaN exactly when it saw a NaN logit (max propagates NaN); its
    weights need not be: XLA's CPU ``exp`` may turn NaN into a finite value inside a fused
    softmax, so the output row is poisoned from the logsumexp, not trusted to carry it.
    """
    return out + nan_at(jnp.isnan(lse), out.dtype)[:, None]
