"""Which implementation runs a call, and why.

Shape glossary: B batch, T query length, S key length, N query heads, K kv heads, G = N/K,
H key head dim, Hv value head dim.

``implementation=None`` picks for you, in this order (the first rule that applies wins):

1. ``return_weights=True`` or active dropout -> ``'xla'`` (the only path that materialises
   the weights; ``'chunked'`` never holds them).
2. An NVIDIA GPU, every cuDNN constraint holds (see ``cudnn_problems``) and no ``bias`` ->
   ``'cudnn'`` (``jax.nn.dot_product_attention(implementation='cudnn')`` on all heads at
   once). A bias can hide every key of a row with ``-inf``, where cuDNN does not return
   jattn's 0, so the automatic choice never sends one to cuDNN.
3. ``T * S >= CHUNKED_MIN_TS`` (512·1024) with a causal mask or a local window, where
   'chunked' skips the hidden tiles, or ``T * S >= CHUNKED_MIN_TS_DENSE`` (1024·1024) without
   one -> ``'chunked'`` (memory-linear flash attention), else ``'xla'``. From the sweep
   (``benchmarks/threshold_sweep.py``, fp32, B=1, N=8, H=64, shared 2-core CPU): at T = S = 768
   without a mask, one run (threshold_sweep.json as of commit 9e7da9c) had 'chunked' at 0.87-1.05x
   jax.nn's speed and 'xla' at 1.00-1.47x; the committed run, under another load, has both
   above jax.nn ('xla' 1.01-1.86x, 'chunked' 1.40-2.08x). With a causal mask 'chunked' is the
   faster from T = 768 in both.

A named implementation runs as asked, with two exceptions: ``'chunked'`` with
``return_weights`` or dropout falls back to ``'xla'`` with a ``UserWarning`` (the result is
exact, only the memory saving is lost), and ``'cudnn'`` where it cannot run raises a
``ValueError`` listing every unmet constraint. An explicit ``'cudnn'`` with a ``bias`` repairs
the rows whose visible bias entries are all ``-inf`` to jattn's result (output 0, logsumexp
``-inf``, zero gradients): they are found from the bias, cuDNN runs them with bias 0 and
their output is replaced by 0. ``explain_implementation``
reports the choice and the reason for any call without running it.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jattn.core.attention import attention_head
from jattn.kernels.chunked import chunked_call
from jattn.core.masks import StructuredMask
from jattn.multihead import register_implementation, register_multihead_implementation, registered_implementations
from jattn.core.spec import Arrays, Config, attention_spec

IMPLEMENTATIONS = ("xla", "chunked", "cudnn")  # the built-ins; registered_implementations() has all
CHUNKED_MIN_TS = 512 * 1024  # T * S from which None picks 'chunked' with a causal mask or window
CHUNKED_MIN_TS_DENSE = 1024 * 1024  # the same without one (no tile to skip; measured)
CUDNN_HEAD_DIMS = range(8, 129, 8)  # head dims cuDNN's fused attention accepts (H == Hv)


def _xla_head(q, k, v, mask, bias, keep, structure, *, scale, logits_soft_cap, block_sizes):
    del block_sizes  # the reference materialises the whole [T, S] tile
    res = attention_head(q, k, v, mask, bias, keep, structure, scale, logits_soft_cap)
    return res.out, res.weights, res.logsumexp


def _cudnn_call(config: Config, a: Arrays):
    """All heads through jax.nn's cuDNN path; returns out [B, T, K, G, Hv], lse [B, T, K, G]."""
    B, T, K, G, H = a.query.shape
    bias, empty = a.bias, None
    if bias is not None:
        # Rows whose visible bias is all -inf must give 0: cuDNN sees bias 0 there (finite
        # forward and backward) and the output is zeroed below.
        empty = _rows_emptied_by_bias(config, bias)  # [Bm, T, Km, Gm]
        bias = jnp.where(jnp.moveaxis(empty, 1, -1)[..., None], jnp.zeros((), bias.dtype), bias)
        Bm, Km, Gm = bias.shape[:3]
        bias = jnp.reshape(bias, (Bm, Km * Gm) + bias.shape[3:])  # [Bm, N|1, T, S]
    out, lse = jax.nn.dot_product_attention(
        jnp.reshape(a.query, (B, T, K * G, H)), a.key, a.value, bias,  # query [B, T, N, H]
        scale=config.scale, is_causal=config.is_causal, local_window_size=config.window,
        implementation="cudnn", return_residual=True,
    )
    out = jnp.reshape(out, (B, T, K, G, H))  # [B, T, K, G, H]
    lse = jnp.reshape(lse.astype(jnp.float32), (B, T, K, G))  # [B, T, K, G]
    if empty is not None:
        out = jnp.where(empty[..., None], jnp.zeros((), out.dtype), out)
        lse = jnp.where(empty, -jnp.inf, lse)
    return out, lse


def _rows_emptied_by_bias(config: Config, bias):
    """[Bm, Km, Gm, T, S] bias -> bool [Bm, T, Km, Gm]: rows whose visible entries are all -inf."""
    T, S = bias.shape[-2:]
    structure = StructuredMask(config.is_causal, config.offset, config.window)
    visible = structure.tile(jnp.arange(T), jnp.arange(S))  # [T, S] or None
    hidden = bias == -jnp.inf  # [Bm, Km, Gm, T, S]
    if visible is not None:
        hidden = hidden | ~visible
    return jnp.moveaxis(jnp.all(hidden, axis=-1), -1, 1)  # [Bm, T, Km, Gm]


register_implementation("xla", _xla_head)
register_multihead_implementation("chunked", chunked_call)
register_multihead_implementation("cudnn", _cudnn_call)


class Choice(NamedTuple):
    """The implementation a call runs, and why."""

    implementation: str
    reason: str


def on_nvidia_gpu() -> bool:
    """True when the default backend is a CUDA GPU (cuDNN's fused attention is available)."""
    if jax.default_backend() != "gpu":
        return False
    return "cuda" in jax.devices()[0].client.platform_version.lower()


def cudnn_problems(config: Config, arrays: Arrays, *, return_weights: bool) -> list[str]:
    """Every reason the cuDNN path cannot run this call exactly as jattn defines it (empty = it can).

    Beyond cuDNN's own limits (fp16/bf16, H == Hv, H a multiple of 8 up to 128, windows only
    with causal masking), calls where a query row could see no key (dense masks, lengths,
    segments, windows reaching past S) are excluded: jattn returns 0 there and cuDNN does not.
    """
    B, T, K, G, H = arrays.query.shape
    S, Hv = arrays.key.shape[1], arrays.value.shape[-1]
    dtype = arrays.query.dtype
    checks = [
        (on_nvidia_gpu(), f"needs an NVIDIA GPU, running on {jax.default_backend()!r}"),
        (dtype in (jnp.float16, jnp.bfloat16), f"needs float16 or bfloat16, got {dtype}"),
        (H == Hv, f"needs value head dim == key head dim, got {Hv} != {H}"),
        (H in CUDNN_HEAD_DIMS, f"needs a head dim that is a multiple of 8 up to 128, got {H}"),
        (min(B, T, S, K, G) > 0, f"needs non-empty inputs, got B={B}, T={T}, S={S}, N={K * G}"),
        (arrays.mask is None, "does not take a dense mask (use lengths, causal or bias)"),
        (arrays.q_lengths is None and arrays.kv_lengths is None,
         "does not take sequence lengths (rows past a length would not be 0)"),
        (arrays.q_segment_ids is None, "does not support segment ids"),
        (config.logits_soft_cap is None, "does not support logits_soft_cap"),
        (config.dropout_rate == 0, "does not support dropout"),
        (not return_weights, "cannot return weights"),
        (config.offset == 0 or not (config.is_causal or config.window),
         "supports causal masks and windows only with causal_alignment='top_left' or T == S"),
        (config.window is None or (config.is_causal and T <= S),
         "supports local windows only together with is_causal=True and T <= S"),
    ]
    return [f"cudnn {msg}" for ok, msg in checks if not ok]


def choose(implementation: str | None, config: Config, arrays: Arrays, *, return_weights: bool) -> Choice:
    """The implementation that will run and the reason (a ValueError if the request is impossible)."""
    known = registered_implementations()
    if implementation is not None and implementation not in known:
        raise ValueError(
            f"implementation: expected None or one of {known} (add one with "
            f"jattn.multihead.register_implementation), got {implementation!r}"
        )
    needs_xla = [why for cond, why in (
        (return_weights, "return_weights=True"),
        (config.dropout_rate > 0, f"dropout_rate={config.dropout_rate}"),
    ) if cond]
    if implementation == "xla":
        return Choice("xla", "requested")
    if implementation == "cudnn":
        problems = cudnn_problems(config, arrays, return_weights=return_weights)
        if problems:
            raise ValueError("implementation: 'cudnn' cannot run this call: " + "; ".join(problems))
        return Choice("cudnn", "requested")
    if needs_xla:
        what = " and ".join(needs_xla)
        return Choice("xla", f"{what} needs the materialised weights, which only 'xla' has")
    if implementation is not None:  # 'chunked' or a registered implementation
        return Choice(implementation, "requested")
    note = ""
    if not cudnn_problems(config, arrays, return_weights=return_weights):
        if arrays.bias is None:
            return Choice("cudnn", "NVIDIA GPU and every cuDNN constraint holds")
        note = " (not 'cudnn': a -inf bias could hide every key of a row, where cuDNN does not give 0)"
    T, S = arrays.query.shape[1], arrays.key.shape[1]
    skips_tiles = config.is_causal or config.window is not None
    threshold, what = ((CHUNKED_MIN_TS, "causal/window") if skips_tiles
                       else (CHUNKED_MIN_TS_DENSE, "no causal/window"))
    if T * S >= threshold:
        return Choice("chunked", f"T*S = {T}*{S} >= {threshold} ({what}): long sequences{note}")
    return Choice("xla", f"T*S = {T}*{S} < {threshold} ({what}): short sequences{note}")


def resolve(implementation: str | None, config: Config, arrays: Arrays, *, return_weights: bool) -> str:
    """The implementation that will run (a registered name, see ``registered_implementations``);
    warns when a requested one falls back to ``'xla'``."""
    choice = choose(implementation, config, arrays, return_weights=return_weights)
    if implementation is not None and choice.implementation != implementation:
        warnings.warn(f"implementation={implementation!r} falls back to 'xla': {choice.reason}", UserWarning,
                      stacklevel=3)
    return choice.implementation


_ARRAY_KWARGS = ("query_seq_lengths", "key_value_seq_lengths", "q_segment_ids", "kv_segment_ids",
                 "dropout_rng")


def explain_implementation(query, key, value, bias=None, mask=None, **kwargs) -> Choice:
    """Which implementation ``jattn.dot_product_attention`` would run for these arguments, and why.

    Validates the arguments the same way (``jattn.core.spec.attention_spec``); nothing is
    computed or compiled.

    Args:
      query: ``[*B, T, N, H]``, an array or a ``jax.ShapeDtypeStruct`` (shapes are enough).
      key: ``[*B, S, K, H]``, likewise.
      value: ``[*B, S, K, Hv]``, likewise.
      bias: as in ``dot_product_attention``.
      mask: as in ``dot_product_attention``.
      **kwargs: the keyword arguments of ``dot_product_attention``.

    Returns:
      ``Choice(implementation, reason)``: the name that would run and why.
    """
    arrays = {name: kwargs.pop(name) for name in _ARRAY_KWARGS if name in kwargs}
    seen: list[Choice] = []

    def probe(q, k, v, b, m, arr):
        spec = attention_spec(q, k, v, b, m, **kwargs, **arr)
        seen.append(choose(spec.implementation, spec.config, spec.arrays, return_weights=spec.return_weights))

    jax.eval_shape(probe, query, key, value, bias, mask, arrays)
    return seen[0]
