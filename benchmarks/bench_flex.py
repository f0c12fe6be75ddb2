"""Benchmark ``jattn.flex_attention`` and jattn's default path against the built-in paths and peers.

Shape glossary: B batch (1), T query length (= S), N heads (8), H head dim (64).

Every timing is CPU, fp32, jitted (torch: eager), forward and forward+backward (gradients of
q, k, v for a fixed cotangent built once outside the timed call). Every ratio compares calls
timed in the same run, in interleaved rounds (each round calls every contender once, in turn),
minimum over rounds; a call slower than ``--slow`` seconds is timed in one round only. Peers are optional (``pip install -e '.[bench]'``): a missing one
is skipped with the reason printed.

- ``speed``: no mask, T = 512 .. 8192: jattn's default (``dot_product_attention``), ``flex_attention``
  without mods, ``jax.nn.dot_product_attention`` (xla), torch's ``scaled_dot_product_attention``
  (its CPU flash kernel), tokamax's ``flex_attention`` (xla backend), and one square XLA matmul
  with the same FLOP count. Each row prints every contender's fraction of that matmul's FLOP
  rate (forward 4·N·T²·H FLOPs, forward+backward 3.5× that) and jattn's time over torch's.
- ``documents``: T=8192, 16 equal documents, causal inside each: flex (block 128) vs jax.nn with
  the equivalent dense boolean mask and tokamax with the same mask_mod; plus the time per
  visited tile against the built-in non-causal ``'chunked'`` at T=4096 (same tiles, no mask),
  also net of the call's cost outside the tiles (the same call with a block mask listing no tile),
  timed in rounds of these jattn calls alone; the peers' speed-ups (and the per-tile ratio
  again, ``*_with_peers``) in rounds of flex, the peers and ``'chunked'``.
- ``causal``: ``mask_mod=causal`` vs ``dot_product_attention(is_causal=True, implementation='chunked')``
  at T=4096, same tiles; torch (is_causal) and tokamax (causal mask_mod) columns.
- ``alibi``: ALiBi ``score_mod`` vs no mod at T=4096 (non-causal); tokamax with the same score_mod.
- ``window``: sliding window 256 (causal) at T=16384 and 32768: time (both lengths in the same
  interleaved rounds, ``--window-rounds``; minimum and median) and compiled temp memory.
- ``memory``: compiled fwd+bwd temp memory with the document mask at T=16384 (compile only).
- ``create_block_mask``: T=S=65536, block 128, document mask: time and compiled temp memory.

Writes ``benchmarks/results/flex_cpu.json`` (``--memory-only``: compile-only temp memory of the
window, document and create_block_mask cases, no timing, into ``flex_cpu_memory.json``).
``--quick`` shrinks every T by 4, ``--smoke`` by 16; ``--cases`` runs a subset.

    flock /tmp/jattn-bench.lock timeout 3000 python benchmarks/bench_flex.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

import jattn
from jattn.flex import mods
from jattn.flex.api import default_block_size

N, H = 8, 64
MiB = 2**20
CASES = ("speed", "documents", "causal", "alibi", "window", "memory", "create_block_mask")
SKIPPED: dict[str, str] = {}  # peer -> why it is not measured


# ----------------------------------------------------------------------------------------
# Peers (optional).
# ----------------------------------------------------------------------------------------


def _torch():
    try:
        import torch
    except ImportError as e:
        SKIPPED["torch"] = f"not installed ({e}); pip install -e '.[bench]'"
        return None
    return torch


def _tokamax_flex():
    """tokamax's flex_attention, xla backend (its only CPU one), or None.

    Not ``tokamax._src.ops.flex_attention.api.IMPLEMENTATIONS['xla']``: importing that module
    fails in tokamax 0.0.12 (it registers a non-existent Triton class); its 'xla' entry is
    ``base.FlexAttention()``.
    """
    try:
        from absl import flags
        from tokamax._src.ops.flex_attention import base
    except ImportError as e:
        SKIPPED["tokamax"] = f"not installed ({e}); pip install -e '.[bench]'"
        return None
    if not flags.FLAGS.is_parsed():  # tokamax reads absl flags, which would parse this script's argv
        flags.FLAGS.mark_as_parsed()
    return base.FlexAttention()


def _tokamax(score=None, mask=None):
    """fn(q, k, v) with tokamax's flex_attention; ``score(s, q_idx, kv_idx, h)`` and ``mask(q_idx, kv_idx)``
    are written on broadcasting index grids (tokamax passes the whole [B, N, T, S] logits, unscaled)."""
    flex = _tokamax_flex()
    if flex is None:
        return None
    scale = 1.0 / H**0.5

    def fn(q, k, v):
        T, S = q.shape[1], k.shape[1]
        q_idx = jnp.arange(T)[:, None]  # [T, 1]
        kv_idx = jnp.arange(S)[None, :]  # [1, S]
        h = jnp.arange(N)[:, None, None]  # [N, 1, 1]

        def score_mod(s):  # [B, N, T, S]
            s = s * scale
            return s if score is None else score(s, q_idx, kv_idx, h)

        mask_mod = None if mask is None else (lambda shape: mask(q_idx, kv_idx))
        return flex(q, k, v, score_mod=score_mod, mask_mod=mask_mod)

    return fn


class _TorchSDPA:
    """torch's scaled_dot_product_attention on the same inputs ([B, T, N, H] -> its [B, N, T, H])."""

    def __init__(self, torch, q, k, v, is_causal=False):
        self.torch, self.is_causal = torch, is_causal
        self.args = [torch.tensor(np.asarray(x)).permute(0, 2, 1, 3).contiguous() for x in (q, k, v)]
        self.w = torch.cos(torch.arange(self.args[0].numel(), dtype=torch.float32)).reshape(self.args[0].shape)

    def fwd(self):
        with self.torch.no_grad():
            return self.torch.nn.functional.scaled_dot_product_attention(*self.args, is_causal=self.is_causal)

    def fwd_bwd(self):
        args = [a.detach().requires_grad_(True) for a in self.args]
        out = self.torch.nn.functional.scaled_dot_product_attention(*args, is_causal=self.is_causal)
        (out * self.w).sum().backward()
        return [a.grad for a in args]


# ----------------------------------------------------------------------------------------
# Timing.
# ----------------------------------------------------------------------------------------


def _inputs(T, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(x, (1, T, N, H), jnp.float32) for x in (kq, kk, kv))


class _fwd_bwd:  # noqa: N801 (used like the function it replaces)
    """The jitted q, k, v gradients of sum(f(q, k, v) * w), called as fn(q, k, v).

    The cotangent w is fixed and built once per shape outside the timed calls, as torch's is
    (``_TorchSDPA``): computed inside the jitted step it added an O(T) cos pass (tens of ms at
    T = 8192) to every jax fwd+bwd timing.
    """

    def __init__(self, f):
        self.grad = jax.jit(jax.grad(lambda q, k, v, w: jnp.sum(f(q, k, v) * w), argnums=(0, 1, 2)))
        self.w = {}

    def _w(self, q, v):
        shape = q.shape[:-1] + v.shape[-1:]  # out [B, T, N, Hv]
        if shape not in self.w:
            self.w[shape] = jnp.cos(jnp.arange(np.prod(shape), dtype=q.dtype).reshape(shape))
        return self.w[shape]

    def __call__(self, q, k, v):
        return self.grad(q, k, v, self._w(q, v))

    def temp_mib(self, q, k, v) -> float:
        return self.grad.lower(q, k, v, self._w(q, v)).compile().memory_analysis().temp_size_in_bytes / MiB


def _time_rounds(fns: dict, args, rounds: int, slow: float) -> dict:
    """Run every fn once (compile), then ``rounds`` interleaved rounds; minimum seconds per fn.

    ``fns`` maps a name to a callable of ``args`` (jax) or of nothing (torch: a zero-arg
    callable, marked by a ``'torch'`` name prefix). A fn whose first timed call takes more than
    ``slow`` seconds is not repeated.
    """
    def once(name, f):
        start = time.perf_counter()
        if name.startswith("torch"):
            f()  # eager: done when it returns
        else:
            jax.block_until_ready(f(*args))
        return time.perf_counter() - start

    for name, f in fns.items():
        once(name, f)  # compile / warm up
    best = {name: once(name, f) for name, f in fns.items()}
    for _ in range(rounds - 1):
        for name, f in fns.items():
            if best[name] <= slow:
                best[name] = min(best[name], once(name, f))
    return best


def _matmul_fns(flops: float) -> tuple:
    """(jitted square matmul with about ``flops`` FLOPs, its inputs, its exact FLOPs)."""
    n = max(64, int(round((flops / 2) ** (1 / 3))))
    a = jnp.ones((n, n), jnp.float32)
    return jax.jit(lambda x, y: x @ y), (a, a), 2.0 * n**3


def _timed_with_matmul(fns: dict, args, flops: float, rounds: int, slow: float) -> tuple[dict, float]:
    """Times of ``fns`` plus the same-run matmul GFLOP/s for ``flops`` (the matmul joins the rounds)."""
    mm, mm_args, mm_flops = _matmul_fns(flops)
    times = _time_rounds({**fns, "matmul": lambda *_: mm(*mm_args)}, args, rounds, slow)
    rate = mm_flops / times.pop("matmul") / 1e9
    return times, rate


def _temp_mib(f, *args) -> float:
    if isinstance(f, _fwd_bwd):
        return f.temp_mib(*args)
    return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes / MiB


def _ms(d: dict) -> dict:
    return {k: v * 1e3 for k, v in d.items()}


# ----------------------------------------------------------------------------------------
# Cases.
# ----------------------------------------------------------------------------------------


def speed(Ts, rounds, slow, max_dense, log):
    torch = _torch()
    for T in Ts:
        q, k, v = _inputs(T)
        fwd_flops = 4.0 * N * T * T * H
        contenders = {
            "jattn": lambda q, k, v: jattn.dot_product_attention(q, k, v),
            "flex": lambda q, k, v: jattn.flex_attention(q, k, v),
        }
        if T <= max_dense:
            contenders["jax.nn"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")
            tok = _tokamax()
            if tok is not None:
                contenders["tokamax"] = tok
        row = dict(case="speed", T=T, jattn_picks=jattn.explain_implementation(q, k, v).implementation,
                   dense_skipped=None if T <= max_dense else f"T > --max-dense {max_dense} ([N, T, T] logits)")
        for mode, mult in (("fwd", 1.0), ("fwd_bwd", 3.5)):
            fns = {name: (jax.jit(f) if mode == "fwd" else _fwd_bwd(f)) for name, f in contenders.items()}
            if torch is not None:
                sdpa = _TorchSDPA(torch, q, k, v)
                fns["torch"] = sdpa.fwd if mode == "fwd" else sdpa.fwd_bwd
            times, rate = _timed_with_matmul(fns, (q, k, v), mult * fwd_flops, rounds, slow)
            row[f"matmul_gflops_{mode}"] = rate
            for name, t in times.items():
                row[f"{name}_{mode}_ms"] = t * 1e3
                row[f"{name}_{mode}_frac_matmul"] = mult * fwd_flops / t / 1e9 / rate
            if "torch" in times:
                row[f"jattn_over_torch_{mode}"] = times["jattn"] / times["torch"]
                row[f"flex_over_torch_{mode}"] = times["flex"] / times["torch"]
        log(row)


def _doc_ids(T, docs):
    return jnp.repeat(jnp.arange(docs, dtype=jnp.int32), T // docs)  # [T]


def _doc_mask_mod(T, docs):
    return mods.and_masks(mods.document(_doc_ids(T, docs)), mods.causal)


def documents(T, rounds, slow, log):
    q, k, v = _inputs(T)
    docs, block = 16, 128
    mask_mod = _doc_mask_mod(T, docs)
    bm = jattn.create_block_mask(mask_mod, None, None, T, T, block_size=block)
    visited = int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum())
    ids = _doc_ids(T, docs)
    dense = ((ids[:, None] == ids[None, :]) & jnp.tril(jnp.ones((T, T), bool)))[None, None]  # [1, 1, T, T]
    # The same call with a block mask that lists no tile: the per-call cost outside the tiles.
    empty = jattn.create_block_mask(lambda b, h, q_idx, kv_idx: q_idx < 0, None, None, T, T, block_size=block)
    flex = {
        "flex": lambda q, k, v: jattn.flex_attention(q, k, v, block_mask=bm),
        "no_tiles": lambda q, k, v: jattn.flex_attention(q, k, v, block_mask=empty),
    }
    peers = {"jax.nn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=dense, implementation="xla")}
    tok = _tokamax(mask=lambda qi, ki: (ids[qi] == ids[ki]) & (ki <= qi))
    if tok is not None:
        peers["tokamax"] = tok
    # Time per visited tile against the built-in non-causal 'chunked' at T/2 with the same tiles
    # (its inputs bound here: it ignores the args). The jattn calls are timed in rounds of their
    # own, and again in the peers' rounds (dense peers allocate a 2 GiB [N, T, S] array per
    # call), which give the speed-ups and the ratio *_with_peers: a control for the peers'
    # effect on the jattn calls (none beyond noise in the run at 3551887: 1.30x / 1.29x fwd+bwd).
    Tc = T // 2
    qc, kc, vc = _inputs(Tc)
    full = lambda q, k, v: jattn.dot_product_attention(q, k, v, implementation="chunked", block_sizes=(block, block))
    per_fwd, per_bwd = jax.jit(full), _fwd_bwd(full)
    fwd_fns = {n: jax.jit(f) for n, f in {**flex, **peers}.items()} | {"chunked": lambda *_: per_fwd(qc, kc, vc)}
    bwd_fns = {n: _fwd_bwd(f) for n, f in {**flex, **peers}.items()} | {"chunked": lambda *_: per_bwd(qc, kc, vc)}

    def timed(fns, names):
        return _ms(_time_rounds({n: fns[n] for n in names}, (q, k, v), rounds, slow))

    alone, with_peers = (*flex, "chunked"), ("flex", *peers, "chunked")
    fwd, bwd = timed(fwd_fns, alone), timed(bwd_fns, alone)
    fwd_p, bwd_p = timed(fwd_fns, with_peers), timed(bwd_fns, with_peers)
    per = {"chunked": fwd["chunked"], "chunked_bwd": bwd["chunked"]}
    tiles_c = (Tc // block) ** 2
    row = dict(case="documents", T=T, docs=docs, block=block, visited_tiles=visited, total_tiles=(T // block) ** 2,
               fwd_ms=fwd["flex"], fwd_bwd_ms=bwd["flex"],
               us_per_tile_fwd=fwd["flex"] / visited * 1e3, us_per_tile_fwd_bwd=bwd["flex"] / visited * 1e3,
               chunked_T=Tc, chunked_us_per_tile_fwd=per["chunked"] / tiles_c * 1e3,
               chunked_us_per_tile_fwd_bwd=per["chunked_bwd"] / tiles_c * 1e3)
    row.update(no_tiles_fwd_ms=fwd["no_tiles"], no_tiles_fwd_bwd_ms=bwd["no_tiles"],
               net_us_per_tile_fwd=(fwd["flex"] - fwd["no_tiles"]) / visited * 1e3,
               net_us_per_tile_fwd_bwd=(bwd["flex"] - bwd["no_tiles"]) / visited * 1e3)
    row.update(flex_fwd_ms_with_peers=fwd_p["flex"], flex_fwd_bwd_ms_with_peers=bwd_p["flex"])
    for name in peers:
        row.update({f"{name}_fwd_ms": fwd_p[name], f"{name}_fwd_bwd_ms": bwd_p[name],
                    f"{name}_fwd_speedup": fwd_p[name] / fwd_p["flex"],
                    f"{name}_fwd_bwd_speedup": bwd_p[name] / bwd_p["flex"]})
    for mode, times in (("fwd", fwd_p), ("fwd_bwd", bwd_p)):
        row[f"per_tile_ratio_{mode}_with_peers"] = (times["flex"] / visited) / (times["chunked"] / tiles_c)
    row["per_tile_definition"] = (
        "us_per_tile = the whole flex call's time / visited_tiles (a tile = one [block, block] tile of each of "
        "the N heads), everything the call does included; chunked_us_per_tile = the whole non-causal "
        "'chunked' call's time at chunked_T with the same tiles / its (chunked_T/block)^2 tiles; "
        "per_tile_ratio_* = their quotient (the issue's target); both calls timed in the same interleaved "
        "rounds of the jattn calls alone, minimum (*_with_peers: in rounds with jax.nn and tokamax, whose "
        "speed-ups come from those rounds). net_*: the flex call's time minus that of the same call visiting no tile "
        "(no_tiles_*), per visited tile, over the same chunked figure (which keeps its own per-call cost): "
        "diagnosis only")
    row["per_tile_ratio_fwd"] = row["us_per_tile_fwd"] / row["chunked_us_per_tile_fwd"]
    row["per_tile_ratio_fwd_bwd"] = row["us_per_tile_fwd_bwd"] / row["chunked_us_per_tile_fwd_bwd"]
    for mode in ("fwd", "fwd_bwd"):  # the tiles alone: without the per-call cost of a T = 8192 call
        row[f"net_per_tile_ratio_{mode}"] = row[f"net_us_per_tile_{mode}"] / row[f"chunked_us_per_tile_{mode}"]
    log(row)


def _versus(case, T, contenders: dict, base: str, flops: float, rounds, slow, torch_sdpa=None, **extra):
    """Row comparing ``contenders`` (``'mod'`` first) with ``base``; matmul fraction for every entry."""
    row = dict(case=case, T=T, **extra)
    for mode, mult in (("fwd", 1.0), ("fwd_bwd", 3.5)):
        fns = {n: (jax.jit(f) if mode == "fwd" else _fwd_bwd(f)) for n, f in contenders.items()}
        if torch_sdpa is not None:
            fns["torch"] = torch_sdpa.fwd if mode == "fwd" else torch_sdpa.fwd_bwd
        times, rate = _timed_with_matmul(fns, _inputs(T), mult * flops, rounds, slow)
        row[f"matmul_gflops_{mode}"] = rate
        for name, t in times.items():
            row[f"{name}_{mode}_ms"] = t * 1e3
            row[f"{name}_{mode}_frac_matmul"] = mult * flops / t / 1e9 / rate
        row[f"{mode}_ratio"] = times["mod"] / times[base]
    return row


def causal(T, rounds, slow, log):
    bm = jattn.create_block_mask(mods.causal, None, None, T, T, block_size=default_block_size(T, T))
    contenders = {
        "mod": lambda q, k, v: jattn.flex_attention(q, k, v, block_mask=bm),
        "builtin": lambda q, k, v: jattn.dot_product_attention(q, k, v, is_causal=True, implementation="chunked"),
    }
    tok = _tokamax(mask=lambda qi, ki: ki <= qi)
    if tok is not None:
        contenders["tokamax"] = tok
    torch = _torch()
    sdpa = None if torch is None else _TorchSDPA(torch, *_inputs(T), is_causal=True)
    log(_versus("causal", T, contenders, "builtin", 2.0 * N * T * T * H, rounds, slow, sdpa,
                block=list(bm.block_size)))


def alibi(T, rounds, slow, log):
    bm = jattn.create_block_mask(None, None, None, T, T, block_size=default_block_size(T, T))
    slopes = mods.alibi_slopes(N)
    contenders = {
        "mod": lambda q, k, v: jattn.flex_attention(q, k, v, score_mod=mods.alibi(slopes), block_mask=bm),
        "none": lambda q, k, v: jattn.flex_attention(q, k, v, block_mask=bm),
    }
    tok = _tokamax(score=lambda s, qi, ki, h: s + slopes[h] * (ki - qi).astype(s.dtype))
    if tok is not None:
        contenders["tokamax"] = tok
    log(_versus("alibi", T, contenders, "none", 4.0 * N * T * T * H, rounds, slow, block=list(bm.block_size)))


def window(Ts, rounds, log):
    """Both lengths timed in the same interleaved rounds (each round: every T's fwd, then every
    T's fwd+bwd), so that a burst of load on the shared machine hits both sides of the ratio;
    the ratios are of the minimum and of the median over the rounds."""
    mask_mod = mods.sliding_window(256)
    calls, temps = {}, {}
    for T in Ts:
        args = _inputs(T)
        bm = jattn.create_block_mask(mask_mod, None, None, T, T, block_size=128)
        flex = lambda q, k, v, bm=bm: jattn.flex_attention(q, k, v, block_mask=bm)
        fwd, fwd_bwd = jax.jit(flex), _fwd_bwd(flex)
        calls[("fwd", T)] = lambda f=fwd, a=args: f(*a)
        calls[("fwd_bwd", T)] = lambda f=fwd_bwd, a=args: f(*a)
        temps[T] = _temp_mib(fwd_bwd, *args)
    for f in calls.values():
        jax.block_until_ready(f())  # compile / warm up
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, f in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(f())
            times[name].append(time.perf_counter() - start)
    rows = []
    for T in Ts:
        row = dict(case="window", T=T, window=256, block=128, rounds=rounds,
                   timing="interleaved rounds over both T; *_ms = minimum, *_median_ms = median",
                   fwd_bwd_temp_mib=temps[T], tokamax="skipped: dense [N, T, T] logits at this T")
        for mode in ("fwd", "fwd_bwd"):
            row[f"{mode}_ms"] = min(times[(mode, T)]) * 1e3
            row[f"{mode}_median_ms"] = float(np.median(times[(mode, T)])) * 1e3
            row[f"{mode}_all_ms"] = [t * 1e3 for t in times[(mode, T)]]
        rows.append(row)
    for a, b in zip(rows, rows[1:]):
        for mode in ("fwd", "fwd_bwd"):
            b[f"{mode}_vs_half_T"] = b[f"{mode}_ms"] / a[f"{mode}_ms"]
            b[f"{mode}_median_vs_half_T"] = b[f"{mode}_median_ms"] / a[f"{mode}_median_ms"]
        b["temp_vs_half_T"] = b["fwd_bwd_temp_mib"] / a["fwd_bwd_temp_mib"]
    for r in rows:
        log(r)


def memory(T, log):
    q, k, v = _inputs(T)
    mask_mod = _doc_mask_mod(T, 16)

    def f(q, k, v):  # the block mask is built inside the step: its memory counts too
        bm = jattn.create_block_mask(mask_mod, None, None, T, T, block_size=128)
        return jattn.flex_attention(q, k, v, block_mask=bm)

    log(dict(case="memory", T=T, docs=16, block=128, fwd_bwd_temp_mib=_temp_mib(_fwd_bwd(f), q, k, v),
             dense_TxS_fp32_mib=N * T * T * 4 / MiB))


def _build_doc_mask(T):
    def build(ids):
        bm = jattn.create_block_mask(mods.and_masks(mods.document(ids), mods.causal), None, None, T, T,
                                     block_size=128)
        return jax.tree.leaves(bm)

    return build


def block_mask_creation(T, rounds, log):
    build, ids = jax.jit(_build_doc_mask(T)), _doc_ids(T, 16)
    jax.block_until_ready(build(ids))
    wall = cpu = float("inf")  # process CPU time too: on a loaded machine it shows the work done
    for _ in range(rounds):
        start, start_cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(build(ids))
        wall, cpu = min(wall, time.perf_counter() - start), min(cpu, time.process_time() - start_cpu)
    log(dict(case="create_block_mask", T=T, block=128, docs=16, ms=wall * 1e3, cpu_ms=cpu * 1e3,
             temp_mib=_temp_mib(_build_doc_mask(T), ids)))


def memory_only(window_Ts, mask_T, log):
    """Compiled temp memory of the window and document cases and of create_block_mask."""
    for T in window_Ts:
        q, k, v = _inputs(T)
        bm = jattn.create_block_mask(mods.sliding_window(256), None, None, T, T, block_size=128)
        flex = lambda q, k, v, bm=bm: jattn.flex_attention(q, k, v, block_mask=bm)
        log(dict(case="window_memory", T=T, window=256, block=128, fwd_bwd_temp_mib=_temp_mib(_fwd_bwd(flex), q, k, v)))
    memory(window_Ts[0], log)
    log(dict(case="create_block_mask_memory", T=mask_T, block=128, docs=16,
             temp_mib=_temp_mib(_build_doc_mask(mask_T), _doc_ids(mask_T, 16))))


# ----------------------------------------------------------------------------------------
# Driver and table.
# ----------------------------------------------------------------------------------------


def _cpu() -> dict:
    """What the ratios depend on: the CPU's model, family/model, vector extensions and per-core
    caches (Linux; the virtual machines this runs on differ between runs: AVX2-only and AVX-512 so far)."""
    info = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        return {"cpu": platform.machine()}
    flags = info.get("flags", "").split()
    caches = {}
    for index in range(4):
        base = f"/sys/devices/system/cpu/cpu0/cache/index{index}/"
        try:
            with open(base + "level") as lv, open(base + "type") as ty, open(base + "size") as sz:
                kind = {"Data": "d", "Instruction": "i"}.get(ty.read().strip(), "")
                caches[f"L{lv.read().strip()}{kind}"] = sz.read().strip()
        except OSError:
            break
    return dict(cpu=info.get("model name", platform.machine()),
                cpu_family_model=f"{info.get('cpu family')}/{info.get('model')}",
                avx2="avx2" in flags, avx512="avx512f" in flags, caches_per_core=caches)


def _commit() -> str:
    """The measured tree: its git commit, '+dirty' if library files differ from it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "jattn"], cwd=root, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every T divided by 4, one round")
    parser.add_argument("--smoke", action="store_true", help="every T divided by 16, one round (does it run?)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--slow", type=float, default=8.0, help="a call slower than this (s) is timed once")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--speed-lengths", type=int, nargs="+", default=[2048, 4096, 1024, 512, 8192],
                        help="in this order (the issue's targets are T >= 2048); the table sorts them")
    parser.add_argument("--max-dense", type=int, default=4096,
                        help="speed: skip the dense [N, T, T] peers (jax.nn, tokamax) above this T")
    parser.add_argument("--window-rounds", type=int, default=5,
                        help="window: interleaved rounds over both lengths (minimum and median reported)")
    parser.add_argument("--memory-only", action="store_true",
                        help="compile-only temp memory (no timing: safe to run beside other jobs)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "flex_cpu.json"))
    args = parser.parse_args()
    if args.memory_only and args.out.endswith("flex_cpu.json"):
        args.out = args.out.replace("flex_cpu.json", "flex_cpu_memory.json")
    div, rounds = (16, 1) if args.smoke else (4, 1) if args.quick else (1, args.rounds)
    rows = []
    started = time.time()

    commit = _commit()

    def meta():
        out = dict(commit=commit, jax=jax.__version__, platform=platform.platform(), processor=platform.processor(),
                   **_cpu(),
                   cpus=os.cpu_count(), N=N, H=H, B=1, dtype="float32", quick=args.quick, smoke=args.smoke,
                   rounds=rounds, slow_s=args.slow, cases=args.cases, peers_skipped=SKIPPED,
                   minutes=(time.time() - started) / 60, load_average=os.getloadavg(),
                   note="minimum over interleaved rounds; load_average says what else ran")
        for name in ("torch", "tokamax"):
            try:
                out[f"{name}_version"] = __import__(name).__version__
            except ImportError:
                pass
        return out

    def log(row):  # the JSON is rewritten after every row: an interrupted run keeps what it measured
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        with open(args.out, "w") as fh:
            json.dump(dict(meta=meta(), rows=rows), fh, indent=1)

    os.makedirs(os.path.dirname(args.out), exist_ok=True)

    if args.memory_only:
        memory_only([16384 // div, 32768 // div], 65536 // div, log)
    else:
        run = set(args.cases)  # the flex targets first: an interrupted run keeps them
        if "causal" in run:
            causal(4096 // div, rounds, args.slow, log)
        if "alibi" in run:
            alibi(4096 // div, rounds, args.slow, log)
        if "create_block_mask" in run:
            block_mask_creation(65536 // div, rounds, log)
        if "documents" in run:
            documents(8192 // div, rounds, args.slow, log)
        if "speed" in run:
            speed([T // div for T in args.speed_lengths], rounds, args.slow, args.max_dense // div, log)
        if "window" in run:
            window([16384 // div, 32768 // div], max(rounds, args.window_rounds) if div == 1 else rounds, log)
        if "memory" in run:
            memory(16384 // div, log)
    print("\n" + table(rows))
    for peer, why in SKIPPED.items():
        print(f"skipped {peer}: {why}")


def _f(r, key, fmt="{:.0f}"):
    return fmt.format(r[key]) if key in r else "-"


def table(rows) -> str:
    """Markdown tables of the rows (what README shows)."""
    out = []
    speed_rows = sorted((r for r in rows if r["case"] == "speed"), key=lambda r: r["T"])
    if speed_rows:
        out.append("| T | mode | matmul GFLOP/s | jattn ms (frac) | flex ms (frac) | torch ms (frac) | jax.nn ms (frac) "
                   "| tokamax ms (frac) | jattn / torch |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for r in speed_rows:
            for mode in ("fwd", "fwd_bwd"):
                cells = [f"{_f(r, f'{n}_{mode}_ms')} ({_f(r, f'{n}_{mode}_frac_matmul', '{:.2f}')})"
                         if f"{n}_{mode}_ms" in r else "-" for n in ("jattn", "flex", "torch", "jax.nn", "tokamax")]
                out.append(f"| {r['T']} | {mode.replace('_', '+')} | {r[f'matmul_gflops_{mode}']:.0f} | "
                           + " | ".join(cells) + f" | {_f(r, f'jattn_over_torch_{mode}', '{:.2f}')} |")
        out.append("")
    case_rows = [r for r in rows if r["case"] in ("documents", "causal", "alibi")]
    if case_rows:
        out.append("| case | T | flex fwd ms | base fwd ms | ratio | flex fwd+bwd ms | base fwd+bwd ms | ratio "
                   "| tokamax fwd / fwd+bwd ms |")
        out.append("|---|---|---|---|---|---|---|---|---|")
    for r in case_rows:
        tok = f"{_f(r, 'tokamax_fwd_ms')} / {_f(r, 'tokamax_fwd_bwd_ms')}"
        if r["case"] == "documents":
            out.append(f"| 16 documents, causal inside (block 128) vs jax.nn + dense mask | {r['T']} | "
                       f"{r['flex_fwd_ms_with_peers']:.0f} | "
                       f"{r['jax.nn_fwd_ms']:.0f} | {r['jax.nn_fwd_speedup']:.1f}x faster | {r['flex_fwd_bwd_ms_with_peers']:.0f} | "
                       f"{r['jax.nn_fwd_bwd_ms']:.0f} | {r['jax.nn_fwd_bwd_speedup']:.1f}x faster | {tok} |")
        elif r["case"] == "causal":
            out.append(f"| mask_mod=causal vs is_causal=True ('chunked'), tiles {tuple(r['block'])} | {r['T']} | "
                       f"{r['mod_fwd_ms']:.0f} | {r['builtin_fwd_ms']:.0f} | {r['fwd_ratio']:.2f} | "
                       f"{r['mod_fwd_bwd_ms']:.0f} | {r['builtin_fwd_bwd_ms']:.0f} | {r['fwd_bwd_ratio']:.2f} | {tok} |")
        else:
            out.append(f"| ALiBi score_mod vs no mod, tiles {tuple(r['block'])} | {r['T']} | {r['mod_fwd_ms']:.0f} | "
                       f"{r['none_fwd_ms']:.0f} | {r['fwd_ratio']:.2f} | {r['mod_fwd_bwd_ms']:.0f} | "
                       f"{r['none_fwd_bwd_ms']:.0f} | {r['fwd_bwd_ratio']:.2f} | {tok} |")
    for r in rows:
        if r["case"] == "documents":
            out.append(f"documents: {r['visited_tiles']}/{r['total_tiles']} tiles visited; time per visited tile "
                       f"{r['per_tile_ratio_fwd']:.2f}x (fwd) / {r['per_tile_ratio_fwd_bwd']:.2f}x (fwd+bwd) the "
                       f"built-in non-causal 'chunked' at T={r['chunked_T']} with the same tiles"
                       + (f"; without the call's cost outside the tiles (the same call visiting no tile: "
                          f"{r['no_tiles_fwd_ms']:.0f} / {r['no_tiles_fwd_bwd_ms']:.0f} ms) "
                          f"{r['net_per_tile_ratio_fwd']:.2f}x / {r['net_per_tile_ratio_fwd_bwd']:.2f}x"
                          if "net_per_tile_ratio_fwd" in r else "")
                       + (f"; in the rounds with jax.nn and tokamax {r['per_tile_ratio_fwd_with_peers']:.2f}x / "
                          f"{r['per_tile_ratio_fwd_bwd_with_peers']:.2f}x" if "per_tile_ratio_fwd_with_peers" in r else ""))
        elif r["case"] == "window":
            out.append(f"window 256, T={r['T']}: fwd {r['fwd_ms']:.0f} ms, fwd+bwd {r['fwd_bwd_ms']:.0f} ms, "
                       f"fwd+bwd temp {r['fwd_bwd_temp_mib']:.1f} MiB"
                       + (f" ({r['fwd_vs_half_T']:.2f}x / {r['fwd_bwd_vs_half_T']:.2f}x / {r['temp_vs_half_T']:.2f}x T/2; "
                          f"medians {r['fwd_median_vs_half_T']:.2f}x / {r['fwd_bwd_median_vs_half_T']:.2f}x)"
                          if "fwd_median_vs_half_T" in r else ""))
        elif r["case"] == "memory":
            out.append(f"documents fwd+bwd temp at T={r['T']}: {r['fwd_bwd_temp_mib']:.1f} MiB "
                       f"(one fp32 [N, T, S] array: {r['dense_TxS_fp32_mib']:.0f} MiB)")
        elif r["case"] == "create_block_mask":
            out.append(f"create_block_mask T=S={r['T']}, block 128, documents: {r['ms']:.0f} ms "
                       f"(process CPU time {r['cpu_ms']:.0f} ms), temp {r['temp_mib']:.1f} MiB")
    return "\n".join(out)


if __name__ == "__main__":
    main()
