"""``jattn.kernels.blockwise``'s tile steps with a ``score_mod`` between the scores and the softmax.

Shape glossary: tq query rows of a tile, tk key columns of a tile, d_k query/key head dim,
d_v value head dim.

``score(s [tq, tk], consts) -> [tq, tk]`` is a ``score_mod`` already bound to the tile's
batch row, head and global positions (``on_tile`` below); ``consts`` are the arrays it
closed over. The logits are ``score(soft_cap(q kᵀ · scale))``; a ``-inf`` score hides an entry
like the mask, a NaN stays visible and propagates. The backward step returns the gradients of
the floating ``consts`` too (``None`` for integer ones), so that a score_mod can be trained
through ring attention. Non-finite q/k/v rows are handled as in ``jattn.kernels.blockwise`` and
``jattn.flex`` (``jattn.core._finite``): only finite rows are multiplied, and NaN is put back
after the score_mod (so no mod can turn it into a number) where a row sees a bad one; an
entry hidden by the mask or by a ``-inf`` score never reaches a row.

``on_tile`` evaluates a mod converted by ``jattn.flex.convert`` (a jaxpr traced on plain
scalars) inside ``jax.shard_map``, where the score and indices vary over mesh axes: every
equation's operands are first cast to the union of their varying axes (``lax.pcast``), which
JAX does by itself when tracing Python but not when evaluating a traced jaxpr; nested
``jit`` and ``custom_jvp`` calls are inlined (a custom derivative rule of a function the mod
calls, e.g. ``jax.nn.relu``, is replaced by the derivative of its definition).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from jattn.core import _finite
from jattn.kernels import blockwise
from jattn.core.masks import combine_masks

_INLINED = {"jit": "jaxpr", "pjit": "jaxpr", "custom_jvp_call": "call_jaxpr", "closed_call": "call_jaxpr"}


def varying_axes(x) -> frozenset:
    """The manual mesh axes over which ``x`` varies inside ``jax.shard_map`` (empty outside)."""
    mat = getattr(jax.typeof(x), "manual_axis_type", None)
    return frozenset(mat.varying) if mat is not None else frozenset()


def _vary(x, axes: frozenset):
    missing = tuple(sorted(axes - varying_axes(x), key=str))
    return jax.lax.pcast(jnp.asarray(x), missing, to="varying") if missing else x


def _eval(jaxpr, consts, args) -> list:
    """``jax.core.eval_jaxpr`` with operands cast to equal varying mesh axes (see above)."""
    env = {}
    read = lambda v: v.val if isinstance(v, jex_core.Literal) else env[v]  # noqa: E731
    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        axes = frozenset().union(*(varying_axes(x) for x in ins))
        ins = [_vary(x, axes) for x in ins] if axes else ins
        name = eqn.primitive.name
        if name in _INLINED and _INLINED[name] in eqn.params:
            closed = eqn.params[_INLINED[name]]
            outs = _eval(closed.jaxpr, closed.consts, ins)
        else:
            outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
            outs = outs if eqn.primitive.multiple_results else [outs]
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def on_tile(mod, consts, score, b, h, q_idx, kv_idx):
    """A converted score_mod on a tile: score [tq, tk], b [], h [], q_idx [tq], kv_idx [tk] -> [tq, tk]."""
    one = lambda s, b, h, qi, ki: _eval(mod.jaxpr, consts, (s, b, h, qi, ki))[0]  # noqa: E731
    over_k = jax.vmap(one, in_axes=(0, None, None, None, 0))
    return jax.vmap(over_k, in_axes=(0, None, None, 0, None))(score, b, h, q_idx, kv_idx)  # [tq, tk]


def _logits(q_fin, k_fin, q_bad, k_bad, mask_tile, score, consts, scale: float, cap: float | None):
    """(capped scores [tq, tk], the score function's VJP, logits [tq, tk], visible [tq, tk]) of
    finite rows ``q_fin``/``k_fin``; NaN is put back for the bad rows after the score_mod, so
    that no mod can hide it (``jattn.core._finite``)."""
    capped, _ = blockwise.tile_logits(q_fin, k_fin, None, None, None, scale, cap)  # finite: no NaN
    floating = [jnp.issubdtype(jnp.result_type(c), jnp.inexact) for c in consts]

    def scored(capped, float_consts):
        it = iter(float_consts)
        return score(capped, tuple(next(it) if f else c for c, f in zip(consts, floating))).astype(capped.dtype)

    logits, score_vjp = jax.vjp(scored, capped, tuple(c for c, f in zip(consts, floating) if f))
    visible = combine_masks(mask_tile, logits != -jnp.inf)  # the score_mod may hide a bad row's entry
    logits = logits + _finite.nan_at(q_bad, logits.dtype)[:, None] + _finite.nan_at(k_bad, logits.dtype)[None, :]
    return capped, score_vjp, logits, visible


def forward_block(carry, q_blk, k_blk, v_blk, mask_tile, score, consts, scale: float, cap: float | None):
    """``blockwise.forward_block`` with ``score`` applied to the (soft-capped) scores."""
    (q_fin, q_bad), (k_fin, k_bad) = _finite.split(q_blk), _finite.split(k_blk)
    _, _, logits, visible = _logits(q_fin, k_fin, q_bad, k_bad, mask_tile, score, consts, scale, cap)
    v_fin, v_bad = _finite.split(v_blk)
    return blockwise.fold(carry, logits, visible, v_fin, v_bad)


def backward_block(q_blk, k_blk, v_blk, do_blk, lse_blk, delta_blk, mask_tile, score, consts,
                   scale: float, cap: float | None):
    """FlashAttention-2 backward of one scored tile: (dq [tq, d_k], dk [tk, d_k], dv [tk, d_v],
    d_consts: one gradient per const, None for integer consts)."""
    (q_fin, q_bad), (k_fin, k_bad) = _finite.split(q_blk), _finite.split(k_blk)
    capped, score_vjp, logits, visible = _logits(q_fin, k_fin, q_bad, k_bad, mask_tile, score, consts, scale, cap)
    ds, dv = blockwise.logit_grads(logits, visible, _finite.split(v_blk)[0], do_blk, lse_blk, delta_blk)
    d_capped, d_float = score_vjp(ds)
    d_raw = d_capped * scale if cap is None else d_capped * (scale * (1.0 - (capped / cap) ** 2))
    dq = jnp.einsum("qk,kd->qd", d_raw, k_fin)  # [tq, d_k]
    dk = jnp.einsum("qk,qd->kd", d_raw, q_fin)  # [tk, d_k]
    it = iter(d_float)
    floating = [jnp.issubdtype(jnp.result_type(c), jnp.inexact) for c in consts]
    return dq, dk, dv, tuple(next(it) if f else None for f in floating)
