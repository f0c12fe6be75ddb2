"""Checking user mods and turning them into closed, vectorised tile functions.

Shape glossary: tq query rows of a tile, tk key columns of a tile.

A ``score_mod(score, b, h, q_idx, kv_idx) -> score`` or ``mask_mod(b, h, q_idx, kv_idx) ->
bool`` is written for scalars. ``convert`` traces it once on scalar placeholders into a jaxpr;
every array it reads from its closure (a bias table, document ids, traced or not) becomes an
explicit *const* argument, so the attention kernel can pass consts through its custom VJP and
return their gradients. ``on_tile`` evaluates the closed function on a whole [tq, tk] tile.

Inside ``jax.shard_map`` (ring attention) the score and indices vary over mesh axes: there the
jaxpr is evaluated equation by equation with every equation's operands first cast to the union
of their varying axes (``lax.pcast``), which JAX does by itself when tracing Python but not
when evaluating a traced jaxpr; nested ``jit`` and ``custom_jvp`` calls are inlined (a custom
derivative rule of a function the mod calls, e.g. ``jax.nn.relu``, is replaced by the
derivative of its definition). Outside ``shard_map`` the jaxpr is evaluated as it is.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

_ARGS = {
    "score_mod": ("score", "b", "h", "q_idx", "kv_idx"),
    "mask_mod": ("b", "h", "q_idx", "kv_idx"),
}

_TRACED_CONTROL_FLOW = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerBoolConversionError,
    jax.errors.TracerIntegerConversionError,
    jax.errors.TracerArrayConversionError,
)


class Converted(NamedTuple):
    """A mod as a jaxpr over (args..., *consts), plus which index arguments it reads.

    Equality and hash ignore the consts and compare the jaxpr's text, so a jitted kernel
    taking the mod as a static argument compiles once per distinct mod, not once per call.
    """

    kind: str  # 'score_mod' or 'mask_mod'
    jaxpr: Any  # jax.core.Jaxpr
    consts: tuple  # the arrays the mod closed over, in jaxpr order
    uses_b: bool  # whether the batch index b reaches the output
    uses_h: bool  # whether the head index h reaches the output
    text: str  # str(jaxpr): the identity of the mod

    def __eq__(self, other):
        return isinstance(other, Converted) and (self.kind, self.text) == (other.kind, other.text)

    def __hash__(self):
        return hash((self.kind, self.text))

    def __call__(self, *args_and_consts):
        """Scalar call: ``(*args, *consts) -> out``."""
        n = len(_ARGS[self.kind])
        args, consts = args_and_consts[:n], args_and_consts[n:]
        if any(varying_axes(x) for x in args_and_consts):
            return _eval_varying(self.jaxpr, consts, args)[0]
        return jax.core.eval_jaxpr(self.jaxpr, consts, *args)[0]


_INLINED = {"jit": "jaxpr", "pjit": "jaxpr", "custom_jvp_call": "call_jaxpr", "closed_call": "call_jaxpr"}


def varying_axes(x) -> frozenset:
    """The manual mesh axes over which ``x`` varies inside ``jax.shard_map`` (empty outside)."""
    mat = getattr(jax.typeof(x), "manual_axis_type", None)
    return frozenset(mat.varying) if mat is not None else frozenset()


def _vary(x, axes: frozenset):
    missing = tuple(sorted(axes - varying_axes(x), key=str))
    return jax.lax.pcast(jnp.asarray(x), missing, to="varying") if missing else x


def _eval_varying(jaxpr, consts, args) -> list:
    """``jax.core.eval_jaxpr`` with operands cast to equal varying mesh axes (module docstring)."""
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
            outs = _eval_varying(closed.jaxpr, closed.consts, ins)
        else:
            outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
            outs = outs if eqn.primitive.multiple_results else [outs]
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def _check_arity(kind: str, mod: Callable) -> None:
    names = _ARGS[kind]
    if not callable(mod):
        raise TypeError(f"{kind}: expected a function {kind}({', '.join(names)}), got {type(mod).__name__}")
    try:
        sig = inspect.signature(mod)
    except (TypeError, ValueError):  # builtins without a signature: let the trace decide
        return
    try:
        sig.bind(*names)
    except TypeError as e:
        raise TypeError(
            f"{kind}: expected a function of {len(names)} positional arguments "
            f"({', '.join(names)}), got {getattr(mod, '__name__', mod)!r} with signature {sig}"
        ) from e


def _reads(jaxpr, var) -> bool:
    """Whether ``var`` feeds any equation or output of ``jaxpr``."""
    if var in jaxpr.outvars:
        return True
    return any(var in eqn.invars for eqn in jaxpr.eqns)


def convert(kind: str, mod: Callable, score_dtype=jnp.float32) -> Converted:
    """Check ``mod`` and trace it on scalars. Raises TypeError/ValueError naming ``kind``.

    Args:
      kind: ``'score_mod'`` or ``'mask_mod'``.
      mod: the user's scalar function.
      score_dtype: dtype of the ``score`` argument (score_mod only).

    Returns:
      ``Converted``: the closed jaxpr and its consts.
    """
    _check_arity(kind, mod)
    idx = jax.ShapeDtypeStruct((), jnp.int32)
    example = (idx,) * 4
    if kind == "score_mod":
        example = (jax.ShapeDtypeStruct((), score_dtype),) + example
    name = getattr(mod, "__name__", repr(mod))
    try:
        closed = jax.make_jaxpr(mod)(*example)
    except _TRACED_CONTROL_FLOW as e:
        raise TypeError(
            f"{kind} {name!r}: Python control flow (if/while/bool()/int()) on traced values is "
            f"not allowed; use jnp.where / jax.lax.select instead. JAX said: {str(e).splitlines()[0]}"
        ) from e
    except TypeError as e:
        raise TypeError(f"{kind} {name!r}: calling it on scalars {_ARGS[kind]} failed: {e}") from e
    outs = closed.out_avals
    if len(outs) != 1:
        raise TypeError(f"{kind} {name!r}: expected one array output, got {len(outs)}")
    out = outs[0]
    if out.shape != ():
        raise ValueError(
            f"{kind} {name!r}: expected a scalar output for scalar inputs {_ARGS[kind]}, "
            f"got shape {out.shape} (a score_mod must not change the score's shape)"
        )
    if kind == "mask_mod" and out.dtype != np.dtype(bool):
        raise TypeError(f"{kind} {name!r}: expected a bool output (True = attend), got {out.dtype}")
    if kind == "score_mod" and not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"{kind} {name!r}: expected a floating score output, got {out.dtype}")
    invars = closed.jaxpr.invars
    b_var, h_var = (invars[1], invars[2]) if kind == "score_mod" else (invars[0], invars[1])
    return Converted(
        kind, closed.jaxpr, tuple(closed.consts), _reads(closed.jaxpr, b_var), _reads(closed.jaxpr, h_var),
        str(closed.jaxpr),
    )


def on_tile(mod: Converted, consts, *args, kv_major: bool = False):
    """Evaluate a converted mod on a tile.

    Args:
      mod: the converted mod.
      consts: its consts (possibly other values than ``mod.consts``, e.g. inside a VJP).
      *args: ``(score,)`` for a score_mod ([tq, tk], or [tk, tq] when ``kv_major``), then
        ``b [], h [], q_idx [tq], kv_idx [tk]``.
      kv_major: lay the tile out keys first (the backward's transposed tiles).

    Returns:
      [tq, tk] (``kv_major``: [tk, tq]): the modified scores, or the bool mask.
    """
    n_consts = len(consts)
    rest = (None,) * n_consts
    if mod.kind == "score_mod":
        score, b, h, q_idx, kv_idx = args
        q_axes, k_axes = (0, None, None, 0, None) + rest, (0, None, None, None, 0) + rest
    else:
        b, h, q_idx, kv_idx = args
        q_axes, k_axes = (None, None, 0, None) + rest, (None, None, None, 0) + rest
    inner, outer = (q_axes, k_axes) if kv_major else (k_axes, q_axes)
    out = jax.vmap(jax.vmap(mod, in_axes=inner), in_axes=outer)(*args, *consts)  # [tq, tk] or [tk, tq]
    shape = (kv_idx.shape[0], q_idx.shape[0]) if kv_major else (q_idx.shape[0], kv_idx.shape[0])
    return jnp.broadcast_to(out, shape)
