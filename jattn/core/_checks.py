"""Argument checks that run on static shapes and dtypes, before anything reaches XLA.

Each check raises ``ValueError`` (wrong shape or value) or ``TypeError`` (wrong type or
dtype), naming the argument and showing what was expected and what arrived. They work the
same eagerly and under ``jax.jit``, since shapes and dtypes are static there.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def shape_of(name: str, x: Any) -> tuple[int, ...]:
    """Shape of an array-like, or a TypeError naming ``name``."""
    try:
        return tuple(jnp.shape(x))
    except Exception as e:  # jnp.shape raises assorted errors for non-arrays
        raise TypeError(f"{name}: expected an array, got {type(x).__name__}") from e


def dtype_of(name: str, x: Any) -> np.dtype:
    try:
        return jnp.result_type(x)
    except Exception as e:
        raise TypeError(f"{name}: expected an array, got {type(x).__name__}") from e


def floating(name: str, x: Any) -> None:
    dt = dtype_of(name, x)
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"{name}: expected a floating dtype (float32, bfloat16, ...), got {dt}")


def boolean(name: str, x: Any) -> None:
    dt = dtype_of(name, x)
    if dt != np.dtype(bool):
        raise TypeError(f"{name}: expected dtype bool (True = attend), got {dt}")


def integer(name: str, x: Any) -> None:
    dt = dtype_of(name, x)
    if not jnp.issubdtype(dt, jnp.integer):
        raise TypeError(f"{name}: expected an integer dtype, got {dt}")


def rank(name: str, x: Any, expected: int | tuple[int, ...], layout: str) -> tuple[int, ...]:
    shape = shape_of(name, x)
    allowed = (expected,) if isinstance(expected, int) else expected
    if len(shape) not in allowed:
        want = f"at least {allowed[0]}" if len(allowed) > 2 else " or ".join(str(r) for r in allowed)
        raise ValueError(f"{name}: expected rank {want} ({layout}), got shape {shape}")
    return shape


def exact_shape(name: str, x: Any, expected: tuple[int, ...], layout: str) -> None:
    shape = shape_of(name, x)
    if shape != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)} ({layout}), got {shape}")


def broadcastable(name: str, x: Any, target: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """Check ``x`` broadcasts to ``target``; return its shape left-padded with 1s to full rank."""
    shape = shape_of(name, x)
    ok = len(shape) <= len(target) and all(
        s in (1, t) for s, t in zip(shape[::-1], target[::-1])
    )
    if not ok:
        raise ValueError(
            f"{name}: expected a shape broadcastable to {tuple(target)} ({layout}), got {shape}"
        )
    return (1,) * (len(target) - len(shape)) + shape


def concrete_number(name: str, x: Any, *, low: float | None = None, high: float | None = None,
                    low_open: bool = False, high_open: bool = False) -> float:
    """A static finite Python number within [low, high] (open ends where asked)."""
    if isinstance(x, jax.core.Tracer):
        raise TypeError(f"{name}: expected a static Python number, got a traced array")
    try:
        value = float(x)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name}: expected a number, got {type(x).__name__}") from e
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{name}: expected a value in {lo}{low}, {high}{hi}, got {value}")
    return value


def qkv(query: Any, key: Any, value: Any, *, names: tuple[str, str, str] = ("query", "key", "value"),
        any_batch: bool = True, given: str = "query", T: str = "T") -> tuple:
    """Checks query [*B, T, N, H], key [*B, S, K, H], value [*B, S, K, Hv] (one float dtype, N % K == 0).

    ``any_batch=False`` asks for exactly one batch dim (rank 4). ``given`` is the array the
    others must match: ``'query'``, or ``'key'`` where key/value are a cache whose shape is fixed
    (a mismatch is then reported on the query). Returns ``(batch_shape, T, N, H, S, K, Hv)``;
    errors name the arguments as ``names`` gives them and the query length ``T``.
    """
    qn, kn, vn = names
    b = "*B" if any_batch else "B"
    ranks = tuple(range(3, 64)) if any_batch else 4
    q_shape = rank(qn, query, ranks, f"[{b}, {T}, N, H]")
    k_shape = shape_of(kn, key)
    v_shape = shape_of(vn, value)
    for name, x in zip(names, (query, key, value)):
        floating(name, x)
    dts = {name: str(dtype_of(name, x)) for name, x in zip(names, (query, key, value))}
    if len(set(dts.values())) != 1:
        raise TypeError(f"{qn}, {kn}, {vn}: expected one dtype, got {dts}")
    batch_shape = q_shape[:-3]
    T, N, H = q_shape[-3:]
    if len(k_shape) != len(q_shape) or k_shape[:-3] != batch_shape or k_shape[-1] != H:
        if given == "key":
            raise ValueError(
                f"{qn}: expected shape {k_shape[:-3] + (T, 'N', k_shape[-1])} ([{b}, {T}, N, H] matching "
                f"{kn} {k_shape}), got {q_shape}"
            )
        raise ValueError(
            f"{kn}: expected shape {batch_shape + ('S', 'K', H)} ([{b}, S, K, H] matching "
            f"{qn} {q_shape}), got {k_shape}"
        )
    S, K = k_shape[-3], k_shape[-2]
    if len(v_shape) != len(k_shape) or v_shape[:-1] != k_shape[:-1]:
        raise ValueError(
            f"{vn}: expected shape {k_shape[:-1] + ('Hv',)} ([{b}, S, K, Hv] matching {kn} "
            f"{k_shape}), got {v_shape}"
        )
    if K == 0 or N % K:
        raise ValueError(f"{qn}, {kn}: the number of query heads N={N} must be a multiple of the kv heads K={K}")
    return batch_shape, T, N, H, S, K, v_shape[-1]


def default_scale(head_dim: int) -> float:
    """``1/sqrt(head_dim)``; 1 for ``head_dim = 0`` (every score is then 0 whatever the scale)."""
    return 1.0 / head_dim**0.5 if head_dim else 1.0


def window(name: str, w: Any, limit: int | None = None) -> tuple[int, int]:
    """``int`` or ``(left, right)`` of non-negative ints -> ``(left, right)``.

    With ``limit`` (T + S: no query is further than that from any key), larger sizes are
    clamped to it; they mean the same (no bound on that side) and stay within int32.
    """
    pair = (w, w) if isinstance(w, (int, np.integer)) else w
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or not all(isinstance(p, (int, np.integer)) and not isinstance(p, bool) for p in pair)
    ):
        raise TypeError(f"{name}: expected an int or a (left, right) pair of ints, got {w!r}")
    if pair[0] < 0 or pair[1] < 0:
        raise ValueError(f"{name}: expected non-negative window sizes, got {tuple(pair)}")
    if limit is not None:
        return min(int(pair[0]), limit), min(int(pair[1]), limit)
    return int(pair[0]), int(pair[1])


def choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")
