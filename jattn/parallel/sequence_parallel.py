"""``sequence_parallel_attention``: ring or Ulysses attention over a mesh axis, in ``jax.shard_map``.

Shape glossary: B batch, T query length, S key length, N query heads, K key/value heads,
H head dim, Hv value head dim, P devices on the sequence axis.

Strategies: ``'ring'`` (``jattn.parallel.ring``: key/value blocks travel around the devices, any
number of heads, windows shorten the ring) or ``'ulysses'`` (``jattn.parallel.ulysses``: all-to-all
from sequence to heads, the single-device kernel, all-to-all back; needs the heads to split
over P). ``'auto'`` picks per call; ``explain_sequence_parallel`` says which and why:

1. P = 1 -> ``'ring'`` (one local ``'chunked'`` pass, nothing is sent).
2. The (per ``head_axis`` shard) query heads are not divisible by P -> ``'ring'``.
3. Otherwise the strategy that sends fewer bytes per device for a forward+backward pass,
   estimated from the shapes: the ring sends its K/V block once per hop forward and again
   backward, plus the dK/dV block (3 blocks per hop; P - 1 hops, fewer with a window), Ulysses
   sends (P-1)/P of q, k, v (kv heads replicated up to a multiple of P) and of the output, and
   as much again backward. These match the bytes read from the compiled HLO
   (``benchmarks/bench_sequence_parallel.py``). Ties go to the ring, whose transfers overlap
   its compute.

The inputs may be unsharded or sharded in any way; they are resharded to the layout the ring
needs (sequence over ``axis_name``; batch over ``batch_axis`` and heads over ``head_axis``
when given) and the output comes back sharded that way. Explicit mesh axes (``jax.make_mesh``'s
default) are resharded with ``jax.reshard``; Auto axes are left to ``shard_map``.

``jattn.sequence_parallel_attention_fn`` (in ``jattn.flax_attention_fn``) wraps it as an
``attention_fn`` for ``jattn.nnx.MultiHeadAttention`` (training and full-sequence forward passes).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from typing import NamedTuple

from jattn.core import _checks, spec
from jattn.parallel.ring import LAYOUTS, _check_divisible, _hops, check_arrays, ring_attention
from jattn.parallel.ulysses import kv_replication, ulysses_attention

STRATEGIES = ("ring", "ulysses", "auto")


def _place(x, mesh: Mesh, spec: P):
    """Reshard ``x`` along the Explicit axes of ``spec``; shard_map itself places Auto axes."""
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    if AxisType.Explicit not in types.values():
        return x
    explicit = P(*(a if a is not None and types[a] == AxisType.Explicit else None for a in spec))
    return jax.reshard(x, NamedSharding(mesh, explicit))


def _axis_size(mesh: Mesh, name: str, axis) -> int:
    """Size of mesh axis ``axis`` (1 for None), or a ValueError naming the argument."""
    if axis is None:
        return 1
    if axis not in mesh.axis_names:
        raise ValueError(f"{name}: expected one of the mesh axes {tuple(mesh.axis_names)}, got {axis!r}")
    return mesh.shape[axis]


def _divides(name: str, what: str, n: int, size: int, axis) -> None:
    if n % size:
        raise ValueError(f"{name}: expected {what} divisible by the size {size} of mesh axis {axis!r}, got {n}")


class Strategy(NamedTuple):
    """The strategy a ``sequence_parallel_attention`` call runs, and why.

    Attributes:
      strategy: ``'ring'`` or ``'ulysses'``.
      reason: why, in words.
      ring_bytes: forward+backward bytes one device sends with the ring (estimate from shapes).
      ulysses_bytes: the same for Ulysses; None where the heads do not split over P.
    """

    strategy: str
    reason: str
    ring_bytes: int
    ulysses_bytes: int | None


def _plan(query, key, value, bias, mask, mesh, axis_name, batch_axis, head_axis, layout, strategy,
          query_seq_lengths, key_value_seq_lengths, q_segment_ids, kv_segment_ids, kwargs) -> Strategy:
    """Validate the arguments (before XLA) and resolve ``strategy``."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh: expected a jax.sharding.Mesh (e.g. from jax.make_mesh), got {type(mesh).__name__}")
    if axis_name is None:
        raise ValueError(f"axis_name: expected one of the mesh axes {tuple(mesh.axis_names)}, got None")
    _checks.choice("strategy", strategy, STRATEGIES)
    P_seq = _axis_size(mesh, "axis_name", axis_name)
    n_batch = _axis_size(mesh, "batch_axis", batch_axis)
    n_head = _axis_size(mesh, "head_axis", head_axis)
    used = [a for a in (axis_name, batch_axis, head_axis) if a is not None]
    if len(set(used)) != len(used):
        raise ValueError(f"axis_name, batch_axis, head_axis: expected distinct mesh axes, got {tuple(used)}")
    B, T, S, N, K = check_arrays(
        query, key, value, bias, mask, query_seq_lengths, key_value_seq_lengths,
        q_segment_ids, kv_segment_ids,
    )
    _checks.choice("layout", layout, LAYOUTS)
    _check_divisible("query", T, P_seq, layout)
    _check_divisible("key", S, P_seq, layout)
    _divides("query", "a batch size", B, n_batch, batch_axis)
    _divides("query", "a number of heads", N, n_head, head_axis)
    _divides("key", "a number of heads", K, n_head, head_axis)
    _, _, window = spec.options(query.shape[-1], kwargs.get("scale"), kwargs.get("logits_soft_cap"),
                                kwargs.get("local_window_size"), None)

    # Per-device forward+backward bytes: local batch, heads and lengths.
    Bl, Nl, Kl, Tl, Sl = B // n_batch, N // n_head, K // n_head, T // P_seq, S // P_seq
    H, Hv = query.shape[-1], value.shape[-1]
    item = jnp.dtype(_checks.dtype_of("query", query)).itemsize
    hops = sum(_hops(bool(kwargs.get("is_causal", False)), window, layout, P_seq, Tl, Sl))
    ring_bytes = 3 * hops * Bl * Sl * Kl * (H + Hv) * item  # K/V forward, K/V and dK/dV backward
    splits = Nl % P_seq == 0
    ulysses_bytes = None
    if splits:
        Kr = Kl * kv_replication(Kl, P_seq)
        ulysses_bytes = 2 * (P_seq - 1) * Bl * (Tl * Nl * (H + Hv) + Sl * Kr * (H + Hv)) * item // P_seq
    mods = [m for m in ("mask_mod", "score_mod") if kwargs.get(m) is not None]
    if mods:
        what = " and ".join(mods)
        if strategy == "ulysses":
            raise ValueError(f"strategy: {what} runs on the ring only; use strategy='ring' or 'auto'")
        return Strategy("ring", f"{what} runs on the ring only" if strategy == "auto" else "asked for",
                        ring_bytes, ulysses_bytes)
    if strategy == "ulysses" and not splits:
        raise ValueError(
            f"strategy: 'ulysses' splits the {Nl} query heads of each device over the {P_seq} devices of "
            f"{axis_name!r}, so they must be divisible by {P_seq}; got {Nl}. Use strategy='ring' or 'auto'"
        )
    if strategy != "auto":
        return Strategy(strategy, "asked for", ring_bytes, ulysses_bytes)
    if P_seq == 1:
        return Strategy("ring", "one device on the sequence axis: nothing is sent", ring_bytes, ulysses_bytes)
    if not splits:
        return Strategy("ring", f"the {Nl} query heads per device do not split over {P_seq} devices (Ulysses "
                        "needs that)", ring_bytes, ulysses_bytes)
    if ulysses_bytes < ring_bytes:
        return Strategy("ulysses", f"the all-to-alls send fewer bytes per device ({ulysses_bytes}) than "
                        f"{hops} ring hops ({ring_bytes})", ring_bytes, ulysses_bytes)
    return Strategy("ring", f"{hops} ring hops send no more bytes per device ({ring_bytes}) than the "
                    f"all-to-alls ({ulysses_bytes}), and overlap with compute", ring_bytes, ulysses_bytes)


def explain_sequence_parallel(query, key, value, bias=None, mask=None, **kwargs) -> Strategy:
    """Which strategy ``sequence_parallel_attention`` runs for these arguments, and why.

    Validates the arguments the same way and computes nothing.

    Args:
      query: ``[B, T, N, H]``, an array or a ``jax.ShapeDtypeStruct``.
      key: ``[B, S, K, H]``, likewise.
      value: ``[B, S, K, Hv]``, likewise.
      bias: must be None, as in ``sequence_parallel_attention``.
      mask: must be None, likewise.
      **kwargs: the keyword arguments of ``sequence_parallel_attention`` (``mesh`` required).

    Returns:
      ``Strategy(strategy, reason, ring_bytes, ulysses_bytes)``.
    """
    return _plan(query, key, value, bias, mask, **_split_kwargs(kwargs))


def _split_kwargs(kwargs):
    """``sequence_parallel_attention``'s keyword arguments as ``_plan``'s."""
    kw = dict(kwargs)
    named = {
        "mesh": None, "axis_name": None, "batch_axis": None, "head_axis": None, "layout": "contiguous",
        "strategy": "ring", "query_seq_lengths": None, "key_value_seq_lengths": None,
        "q_segment_ids": None, "kv_segment_ids": None,
    }
    if "mesh" not in kw:
        raise TypeError("mesh: expected a jax.sharding.Mesh (e.g. from jax.make_mesh), got nothing")
    out = {name: kw.pop(name, default) for name, default in named.items()}
    out["kwargs"] = kw
    return out


def sequence_parallel_attention(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    mesh: Mesh,
    axis_name: str,
    batch_axis: str | None = None,
    head_axis: str | None = None,
    layout: str = "contiguous",
    strategy: str = "ring",
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    **kwargs,
):
    """Attention with the sequence sharded over mesh axis ``axis_name`` (ring or Ulysses).

    Equal to ``jattn.dot_product_attention`` on the same arrays. Call it outside
    ``shard_map``, on GLOBAL arrays, sharded or not.

    Args:
      query: ``[B, T, N, H]``; T divisible by P, the size of ``axis_name`` (by 2P for
        ``layout='zigzag'``).
      key: ``[B, S, K, H]``, N a multiple of K; S divisible like T.
      value: ``[B, S, K, Hv]``.
      bias: must be None (the ring takes no dense masks; ValueError).
      mask: must be None, likewise.
      mesh: the ``jax.sharding.Mesh``.
      axis_name: the mesh axis the sequence is sharded over.
      batch_axis: a mesh axis to shard the batch over, or None.
      head_axis: a mesh axis to shard the heads (N and K) over, or None.
      layout: ``'contiguous'`` or ``'zigzag'`` (causal load balance): for ``'zigzag'`` the
        caller has permuted the rows with ``jattn.parallel.ring.to_layout`` and passes
        positions ``jattn.parallel.ring.layout_positions`` to RoPE.
      strategy: ``'ring'`` (default), ``'ulysses'`` (the heads per device must be divisible
        by P) or ``'auto'`` (fewer bytes sent; see ``explain_sequence_parallel``).
      query_seq_lengths: ``[B]`` integers, as in ``dot_product_attention``.
      key_value_seq_lengths: ``[B]`` integers.
      q_segment_ids: ``[B, T]`` integers, in ``layout``; both segment ids or neither.
      kv_segment_ids: ``[B, S]`` integers, in ``layout``.
      **kwargs: ``is_causal``, ``scale``, ``logits_soft_cap``, ``local_window_size``,
        ``block_sizes``, and (ring only) ``mask_mod`` and ``score_mod`` on global indices
        (batch row, head, original positions; see ``ring_attention``).

    Returns:
      ``[B, T, N, Hv]`` in ``layout``, sharded as ``P(batch_axis, axis_name, head_axis)``.
    """
    plan = _plan(query, key, value, bias, mask, mesh, axis_name, batch_axis, head_axis, layout, strategy,
                 query_seq_lengths, key_value_seq_lengths, q_segment_ids, kv_segment_ids, kwargs)
    rows = P(batch_axis, axis_name, head_axis)  # [B, T|S, N|K, H]
    arrays = {"query": query, "key": key, "value": value}
    specs = {"query": rows, "key": rows, "value": rows}
    per_example = {
        "query_seq_lengths": (query_seq_lengths, P(batch_axis)),  # [B]
        "key_value_seq_lengths": (key_value_seq_lengths, P(batch_axis)),  # [B]
        "q_segment_ids": (q_segment_ids, P(batch_axis, axis_name)),  # [B, T]
        "kv_segment_ids": (kv_segment_ids, P(batch_axis, axis_name)),  # [B, S]
    }
    for name, (x, placement) in per_example.items():
        if x is not None:
            arrays[name], specs[name] = x, placement
    for name in ("scale", "logits_soft_cap"):  # static options: a jnp scalar becomes a float
        if kwargs.get(name) is not None:
            kwargs[name] = _checks.concrete_number(name, kwargs[name])
    options = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()))
    return _run(arrays, tuple(specs.items()), mesh, axis_name, batch_axis, head_axis, layout, plan.strategy,
                options)


@functools.partial(jax.jit, static_argnums=tuple(range(1, 9)))
def _run(arrays, specs, mesh, axis_name, batch_axis, head_axis, layout, strategy, options):
    """Jitted, so that eager calls do not run the shard_map body op by op."""
    specs = dict(specs)
    arrays = {name: _place(x, mesh, specs[name]) for name, x in arrays.items()}
    rows = P(batch_axis, axis_name, head_axis)
    attend = ulysses_attention
    if strategy != "ulysses":  # the mods see global batch rows and heads
        attend = functools.partial(ring_attention, batch_axis=batch_axis, head_axis=head_axis)

    def local(arrays):
        return attend(**arrays, axis_name=axis_name, layout=layout, **dict(options))

    return jax.shard_map(local, mesh=mesh, in_specs=(specs,), out_specs=rows)(arrays)
