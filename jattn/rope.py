"""Rotary position embedding (RoPE), usable on its own or inside the Flax modules.

Shape glossary: B batch (any number of leading dims), T sequence length, N heads,
H head dim (even).

Convention: the head dim is split into halves ``(x1, x2)`` and each pair ``(x1[i], x2[i])`` is
rotated by the angle ``position · base^(-2i/H)`` (the "rotate half" layout of GPT-NeoX / LLaMA
in JAX code bases). A query at position m and a key at position n then score
``<rope(q, m), rope(k, n)>``, a function of ``q, k`` and ``m - n`` only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jattn.core import _checks


def apply_rope(x, positions, base: float = 10000.0) -> jax.Array:
    """Rotate each head of ``x`` by the angles of its positions (RoPE), in fp32.

    Args:
      x: ``[..., T, N, H]`` queries or keys, floating, H even.
      positions: ``[..., T]`` integer or float positions, broadcasting against the batch dims
        of ``x`` (``[T]`` is shared by every row).
      base: the frequency base, > 1.

    Returns:
      ``[..., T, N, H]``: ``x`` rotated, in the dtype of ``x``.
    """
    shape = _checks.rank("x", x, tuple(range(3, 64)), "[..., T, N, H]")
    _checks.floating("x", x)
    T, H = shape[-3], shape[-1]
    if H % 2:
        raise ValueError(f"x: expected an even head dim H (pairs are rotated), got H={H} in shape {shape}")
    pos_shape = _checks.shape_of("positions", positions)
    pos_dtype = _checks.dtype_of("positions", positions)
    if not (jnp.issubdtype(pos_dtype, jnp.integer) or jnp.issubdtype(pos_dtype, jnp.floating)):
        raise TypeError(f"positions: expected an integer or floating dtype, got {pos_dtype}")
    if len(pos_shape) < 1 or pos_shape[-1] != T:
        raise ValueError(f"positions: expected shape [..., T] with T={T} (x has shape {shape}), got {pos_shape}")
    _checks.broadcastable("positions", positions, shape[:-2], "[..., T] matching x [..., T, N, H]")
    base = _checks.concrete_number("base", base, low=1.0, low_open=True)
    return _rotate(x, positions, base)


@functools.partial(jax.jit, static_argnames=("base",))
def _rotate(x, positions, base: float):
    H = x.shape[-1]
    half = H // 2
    inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / H)  # [H/2]
    angles = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq  # [..., T, H/2]
    cos = jnp.cos(angles)[..., None, :]  # [..., T, 1, H/2]
    sin = jnp.sin(angles)[..., None, :]  # [..., T, 1, H/2]
    x32 = jnp.asarray(x, jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]  # [..., T, N, H/2] each
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # [..., T, N, H]
    return rotated.astype(jnp.result_type(x))
