"""Benchmark ``jattn.flex_attention`` (programmable masks/scores) against the built-in paths and jax.nn.

Shape glossary: B batch (1), T query length (= S), N heads (8), H head dim (64).

Cases (CPU, fp32, jitted; every ratio compares two calls timed in the same run, in
interleaved rounds, minimum over rounds):

- ``documents``: T=8192, 16 equal documents, causal inside each: flex (block 128) vs
  ``jax.nn.dot_product_attention`` with the equivalent dense boolean mask, fwd and fwd+bwd;
  plus the time per visited score entry against the built-in non-causal ``'chunked'`` at T=4096.
- ``causal``: ``mask_mod=causal`` vs ``dot_product_attention(is_causal=True,
  implementation='chunked')`` at T=4096 (same (512, 256) blocks).
- ``alibi``: ALiBi ``score_mod`` vs no mod at T=4096 (non-causal).
- ``window``: sliding window 256 (causal) at T=16384 and 32768: time and compiled temp memory.
- ``memory``: compiled fwd+bwd temp memory with the document mask at T=16384 (compile only).
- ``create_block_mask``: T=S=65536, block 128, document mask: time and compiled temp memory.

Writes ``benchmarks/results/flex_cpu.json`` (``--memory-only``: compile-only temp memory of the
window, document and create_block_mask cases, no timing, into ``flex_cpu_memory.json``). ``--quick`` shrinks every T by 4, ``--smoke`` by 16.

    flock /tmp/jattn-bench.lock timeout 3000 python benchmarks/bench_flex.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp

import jattn
from jattn.flex import mods

N, H = 8, 64
MiB = 2**20


def _inputs(T, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(x, (1, T, N, H), jnp.float32) for x in (kq, kk, kv))


def _fwd_bwd(f):
    """jit of the q, k, v gradients of sum(f(q, k, v) * w) with a fixed random cotangent."""
    def loss(q, k, v):
        out = f(q, k, v)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size, dtype=out.dtype).reshape(out.shape)))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _time_rounds(fns: dict, args, rounds: int) -> dict:
    """Compile every fn, then ``rounds`` interleaved rounds; minimum seconds per fn."""
    for f in fns.values():
        jax.block_until_ready(f(*args))
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(f(*args))
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _temp_mib(f, *args) -> float:
    return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes / MiB


def _doc_ids(T, docs):
    return jnp.repeat(jnp.arange(docs, dtype=jnp.int32), T // docs)  # [T]


def _doc_mask_mod(T, docs):
    return mods.and_masks(mods.document(_doc_ids(T, docs)), mods.causal)


def documents(T, rounds, log):
    q, k, v = _inputs(T)
    docs = 16
    mask_mod = _doc_mask_mod(T, docs)
    bm = jattn.create_block_mask(mask_mod, None, None, T, T, block_size=128)
    visited = int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum())
    ids = _doc_ids(T, docs)
    dense = ((ids[:, None] == ids[None, :]) & jnp.tril(jnp.ones((T, T), bool)))[None, None]  # [1, 1, T, T]
    flex = lambda q, k, v: jattn.flex_attention(q, k, v, block_mask=bm)
    ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=dense, implementation="xla")
    fwd = _time_rounds({"flex": jax.jit(flex), "jax.nn": jax.jit(ref)}, (q, k, v), rounds)
    bwd = _time_rounds({"flex": _fwd_bwd(flex), "jax.nn": _fwd_bwd(ref)}, (q, k, v), max(1, rounds - 1))
    # Time per visited score entry against the built-in non-causal 'chunked' at T/2.
    Tc = T // 2
    qc, kc, vc = _inputs(Tc)
    full = lambda q, k, v: jattn.dot_product_attention(q, k, v, implementation="chunked")
    per = _time_rounds({"chunked": jax.jit(full), "chunked_bwd": _fwd_bwd(full)}, (qc, kc, vc), rounds)
    flex_entries = visited * 128 * 128
    row = dict(
        case="documents", T=T, docs=docs, block=128, visited_tiles=visited, total_tiles=(T // 128) ** 2,
        fwd_ms=fwd["flex"] * 1e3, jax_nn_fwd_ms=fwd["jax.nn"] * 1e3, fwd_speedup=fwd["jax.nn"] / fwd["flex"],
        fwd_bwd_ms=bwd["flex"] * 1e3, jax_nn_fwd_bwd_ms=bwd["jax.nn"] * 1e3,
        fwd_bwd_speedup=bwd["jax.nn"] / bwd["flex"],
        ns_per_entry_fwd=fwd["flex"] / flex_entries * 1e9,
        chunked_ns_per_entry_fwd=per["chunked"] / Tc**2 * 1e9,
        ns_per_entry_fwd_bwd=bwd["flex"] / flex_entries * 1e9,
        chunked_ns_per_entry_fwd_bwd=per["chunked_bwd"] / Tc**2 * 1e9,
    )
    row["per_entry_ratio_fwd"] = row["ns_per_entry_fwd"] / row["chunked_ns_per_entry_fwd"]
    row["per_entry_ratio_fwd_bwd"] = row["ns_per_entry_fwd_bwd"] / row["chunked_ns_per_entry_fwd_bwd"]
    log(row)


def causal(T, rounds, log):
    q, k, v = _inputs(T)
    bm = jattn.create_block_mask(mods.causal, None, None, T, T, block_size=(512, 256))
    flex = lambda q, k, v: jattn.flex_attention(q, k, v, block_mask=bm)
    builtin = lambda q, k, v: jattn.dot_product_attention(q, k, v, is_causal=True, implementation="chunked")
    fwd = _time_rounds({"flex": jax.jit(flex), "builtin": jax.jit(builtin)}, (q, k, v), rounds)
    bwd = _time_rounds({"flex": _fwd_bwd(flex), "builtin": _fwd_bwd(builtin)}, (q, k, v), rounds)
    log(dict(case="causal", T=T, block=[512, 256], fwd_ms=fwd["flex"] * 1e3, builtin_fwd_ms=fwd["builtin"] * 1e3,
             fwd_ratio=fwd["flex"] / fwd["builtin"], fwd_bwd_ms=bwd["flex"] * 1e3,
             builtin_fwd_bwd_ms=bwd["builtin"] * 1e3, fwd_bwd_ratio=bwd["flex"] / bwd["builtin"]))


def alibi(T, rounds, log):
    q, k, v = _inputs(T)
    bm = jattn.create_block_mask(None, None, None, T, T, block_size=(512, 256))
    slopes = mods.alibi_slopes(N)
    with_mod = lambda q, k, v: jattn.flex_attention(q, k, v, score_mod=mods.alibi(slopes), block_mask=bm)
    no_mod = lambda q, k, v: jattn.flex_attention(q, k, v, block_mask=bm)
    fwd = _time_rounds({"alibi": jax.jit(with_mod), "none": jax.jit(no_mod)}, (q, k, v), rounds)
    bwd = _time_rounds({"alibi": _fwd_bwd(with_mod), "none": _fwd_bwd(no_mod)}, (q, k, v), rounds)
    log(dict(case="alibi", T=T, block=[512, 256], fwd_ms=fwd["alibi"] * 1e3, no_mod_fwd_ms=fwd["none"] * 1e3,
             fwd_ratio=fwd["alibi"] / fwd["none"], fwd_bwd_ms=bwd["alibi"] * 1e3,
             no_mod_fwd_bwd_ms=bwd["none"] * 1e3, fwd_bwd_ratio=bwd["alibi"] / bwd["none"]))


def window(Ts, rounds, log):
    mask_mod = mods.sliding_window(256)
    rows = []
    for T in Ts:
        q, k, v = _inputs(T)
        bm = jattn.create_block_mask(mask_mod, None, None, T, T, block_size=128)
        flex = lambda q, k, v, bm=bm: jattn.flex_attention(q, k, v, block_mask=bm)
        fwd = _time_rounds({"flex": jax.jit(flex)}, (q, k, v), rounds)["flex"]
        bwd = _time_rounds({"flex": _fwd_bwd(flex)}, (q, k, v), rounds)["flex"]
        temp = _temp_mib(_fwd_bwd(flex), q, k, v)
        rows.append(dict(case="window", T=T, window=256, block=128, fwd_ms=fwd * 1e3, fwd_bwd_ms=bwd * 1e3,
                         fwd_bwd_temp_mib=temp))
    for a, b in zip(rows, rows[1:]):
        b["fwd_vs_half_T"] = b["fwd_ms"] / a["fwd_ms"]
        b["fwd_bwd_vs_half_T"] = b["fwd_bwd_ms"] / a["fwd_bwd_ms"]
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


def block_mask_creation(T, rounds, log):
    def build(ids):
        bm = jattn.create_block_mask(mods.and_masks(mods.document(ids), mods.causal), None, None, T, T,
                                     block_size=128)
        return jax.tree.leaves(bm)

    ids = _doc_ids(T, 16)
    f = jax.jit(build)
    jax.block_until_ready(f(ids))
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(f(ids))
        best = min(best, time.perf_counter() - start)
    log(dict(case="create_block_mask", T=T, block=128, docs=16, ms=best * 1e3,
             temp_mib=jax.jit(build).lower(ids).compile().memory_analysis().temp_size_in_bytes / MiB))


def memory_only(window_Ts, mask_T, log):
    """Compiled temp memory of the window and document cases and of create_block_mask."""
    for T in window_Ts:
        q, k, v = _inputs(T)
        bm = jattn.create_block_mask(mods.sliding_window(256), None, None, T, T, block_size=128)
        flex = lambda q, k, v, bm=bm: jattn.flex_attention(q, k, v, block_mask=bm)
        log(dict(case="window_memory", T=T, window=256, block=128, fwd_bwd_temp_mib=_temp_mib(_fwd_bwd(flex), q, k, v)))
    memory(window_Ts[0], log)

    def build(ids):
        return jax.tree.leaves(jattn.create_block_mask(mods.and_masks(mods.document(ids), mods.causal), None, None,
                                                       mask_T, mask_T, block_size=128))

    log(dict(case="create_block_mask_memory", T=mask_T, block=128, docs=16,
             temp_mib=jax.jit(build).lower(_doc_ids(mask_T, 16)).compile().memory_analysis().temp_size_in_bytes / MiB))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every T divided by 4, one round")
    parser.add_argument("--smoke", action="store_true", help="every T divided by 16, one round (does it run?)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory-only", action="store_true",
                        help="compile-only temp memory (no timing: safe to run beside other jobs)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "flex_cpu.json"))
    args = parser.parse_args()
    if args.memory_only and args.out.endswith("flex_cpu.json"):
        args.out = args.out.replace("flex_cpu.json", "flex_cpu_memory.json")
    div, rounds = (16, 1) if args.smoke else (4, 1) if args.quick else (1, args.rounds)
    rows = []

    def log(row):
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    if args.memory_only:
        memory_only([16384 // div, 32768 // div], 65536 // div, log)
    else:
        documents(8192 // div, rounds, log)
        causal(4096 // div, rounds, log)
        alibi(4096 // div, rounds, log)
        window([16384 // div, 32768 // div], rounds, log)
        memory(16384 // div, log)
        block_mask_creation(65536 // div, rounds, log)
    meta = dict(jax=jax.__version__, platform=platform.platform(), processor=platform.processor(),
                cpus=os.cpu_count(), N=N, H=H, B=1, dtype="float32", quick=args.quick, rounds=rounds,
                note="shared 2-core machine (other jobs running); minimum over interleaved rounds")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(dict(meta=meta, rows=rows), fh, indent=1)
    _print_table(rows)


def _print_table(rows):
    print("\n| case | T | flex fwd ms | peer fwd ms | ratio | flex fwd+bwd ms | peer fwd+bwd ms | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["case"] == "documents":
            print(f"| documents (16, causal) vs jax.nn dense mask | {r['T']} | {r['fwd_ms']:.0f} | "
                  f"{r['jax_nn_fwd_ms']:.0f} | {r['fwd_speedup']:.1f}x faster | {r['fwd_bwd_ms']:.0f} | "
                  f"{r['jax_nn_fwd_bwd_ms']:.0f} | {r['fwd_bwd_speedup']:.1f}x faster |")
        elif r["case"] == "causal":
            print(f"| mask_mod=causal vs is_causal=True | {r['T']} | {r['fwd_ms']:.0f} | {r['builtin_fwd_ms']:.0f} | "
                  f"{r['fwd_ratio']:.2f} | {r['fwd_bwd_ms']:.0f} | {r['builtin_fwd_bwd_ms']:.0f} | "
                  f"{r['fwd_bwd_ratio']:.2f} |")
        elif r["case"] == "alibi":
            print(f"| ALiBi score_mod vs no mod | {r['T']} | {r['fwd_ms']:.0f} | {r['no_mod_fwd_ms']:.0f} | "
                  f"{r['fwd_ratio']:.2f} | {r['fwd_bwd_ms']:.0f} | {r['no_mod_fwd_bwd_ms']:.0f} | "
                  f"{r['fwd_bwd_ratio']:.2f} |")
    for r in rows:
        if r["case"] == "documents":
            print(f"documents: {r['visited_tiles']}/{r['total_tiles']} tiles visited; time per visited score entry "
                  f"{r['per_entry_ratio_fwd']:.2f}x (fwd) / {r['per_entry_ratio_fwd_bwd']:.2f}x (fwd+bwd) the "
                  f"built-in non-causal 'chunked' at T={r['T'] // 2}")
        elif r["case"] == "window":
            print(f"window 256, T={r['T']}: fwd {r['fwd_ms']:.0f} ms, fwd+bwd {r['fwd_bwd_ms']:.0f} ms, "
                  f"fwd+bwd temp {r['fwd_bwd_temp_mib']:.1f} MiB"
                  + (f" ({r['fwd_vs_half_T']:.2f}x / {r['fwd_bwd_vs_half_T']:.2f}x / {r['temp_vs_half_T']:.2f}x T/2)"
                     if "fwd_vs_half_T" in r else ""))
        elif r["case"] == "memory":
            print(f"documents fwd+bwd temp at T={r['T']}: {r['fwd_bwd_temp_mib']:.1f} MiB "
                  f"(one fp32 [N, T, S] array: {r['dense_TxS_fp32_mib']:.0f} MiB)")
        elif r["case"] == "create_block_mask":
            print(f"create_block_mask T=S={r['T']}, block 128, documents: {r['ms']:.0f} ms, temp {r['temp_mib']:.1f} MiB")


if __name__ == "__main__":
    main()
