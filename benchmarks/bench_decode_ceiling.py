"""How fast can a decode step read on XLA CPU? The ceiling behind decode_attention, and the
ideas for reaching the read bandwidth, measured side by side.

Shape glossary: B batch, S cache length, K kv heads, H head dim, N query heads, R = N/K query
rows per kv head (one new token), c split size (positions), J = S/c splits per row.

``jattn.decode_attention`` visits the cache split by split in a ``lax.fori_loop`` (so that
it can skip what a row does not need). This script times, in one run and interleaved rounds
(min of the rounds; the machine may be shared), at B=8, N=32, K=8, H=128, fp32, full lengths:

- ``reference sum``: a jitted sum over the whole K and V caches (the read bandwidth that
  ``benchmarks/bench_decode.py`` divides by);
- ``loop of sums, c=..., rows=...``: a ``fori_loop`` whose body only sums one split of K and
  V (``rows`` batch rows of ``c`` positions, a ``dynamic_slice`` each): any split loop's best
  case, since a decode step does more work per byte than a sum;
- ``decode_attention``: the library's decode step;
- ``idea 1: two loops (halves of the work list)`` and ``idea 1: one loop per row (8 loops)``:
  the same splits cut into independent ``fori_loop`` s inside one jit (exact logsumexp merge at
  the end), so that XLA CPU's thunk executor may run them on both cores at once;
- ``idea 2: no loop, all splits batched``: every split at once as ``[B, J, c, K, H]`` products
  and sums, with no loop (nothing skipped: the full-length case only);
- ``body: logits reduced over H (minor axis)``: the same loop with the logits computed as a
  product summed over the minor ``H`` axis of the split as it is;
- ``body: head-major split copy, batched dots``: the same loop with each split copied as
  ``[K, c, H]`` (the transpose fused into the copy XLA makes anyway) and the logits and
  weighted values as batched matrix products with the kv heads as the batch axis.

The idea rows reuse the library's split loop (``split_partial``, 256-position splits).

Each row records the wall time and the process CPU time (all threads; less sensitive to other
jobs on the machine than the wall time, and it shows the work a path does per byte); the
fractions are the reference sum's time over the row's, in wall and in CPU time. It also records
what the compiled ``decode_attention`` allocates: temp bytes and any instruction (other than
parameters, tuples and loops) whose result has as many elements as a cache (a whole-cache copy
or transpose; there must be none). Writes ``benchmarks/results/decode_ceiling.json``.

    python benchmarks/bench_decode_ceiling.py            # S = 16384
    python benchmarks/bench_decode_ceiling.py --seq 4096
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import jattn  # noqa: E402
from jattn.kernels import decode as D  # noqa: E402

B, N, K, H = 8, 32, 8, 128
R = N // K


def loop_of_sums(k, v, *, c: int, rows: int):
    """Sum of K and V read split by split: ``rows`` batch rows × ``c`` positions per step."""
    S = k.shape[1]
    J = S // c  # splits per row group

    def body(i, acc):
        b, j = (i // J) * rows, i % J
        zero = jnp.zeros((), jnp.int32)
        ks = jax.lax.dynamic_slice(k, (b, j * c, zero, zero), (rows, c, K, H))  # [rows, c, K, H]
        vs = jax.lax.dynamic_slice(v, (b, j * c, zero, zero), (rows, c, K, H))
        return acc + jnp.sum(ks) + jnp.sum(vs)

    return jax.lax.fori_loop(0, (B // rows) * J, body, jnp.zeros((), jnp.float32))


def logits_h_minor(q, k, v, pos, first, length, Tq, static):
    """``D.split_partial`` with the logits as a product summed over the minor H axis."""
    G = q.shape[1] // Tq
    s = jnp.sum(k[:, :, None, :] * (q * static.scale)[None], axis=-1)  # [c, K, R]
    q_pos = length - Tq + jnp.arange(q.shape[1]) // G  # [R]
    key_ok = (pos >= first) & (pos < length)  # [c]
    s = jnp.where((key_ok[:, None] & (pos[:, None] <= q_pos[None]))[:, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=0)  # [K, R]
    p = jnp.exp(s - jnp.where(m == -jnp.inf, 0.0, m)[None])  # [c, K, R]
    v = jnp.where(key_ok[:, None, None], v, 0.0)
    return D.Partial(m, jnp.sum(p, axis=0), jnp.sum(p[..., None] * v[:, :, None, :], axis=0))


def head_major(q, k, v, pos, first, length, Tq, static):
    """``D.split_partial`` on the split copied head-major ``[K, c, H]`` (XLA fuses the transpose
    into the split's copy), logits and weighted values as batched dots over the kv heads."""
    G = q.shape[1] // Tq
    key_ok = (pos >= first) & (pos < length)  # [c]
    kt = jnp.transpose(k, (1, 0, 2))  # [K, c, H]
    vt = jnp.transpose(jnp.where(key_ok[:, None, None], v, 0.0), (1, 0, 2))  # [K, c, H]
    s = jnp.einsum("kch,krh->krc", kt, q * static.scale)  # [K, R, c]
    q_pos = length - Tq + jnp.arange(q.shape[1]) // G  # [R]
    s = jnp.where((key_ok[None, :] & (pos[None, :] <= q_pos[:, None]))[None], s, -jnp.inf)
    m = jnp.max(s, axis=-1)  # [K, R]
    p = jnp.exp(s - jnp.where(m == -jnp.inf, 0.0, m)[..., None])  # [K, R, c]
    return D.Partial(m, jnp.sum(p, axis=-1), jnp.einsum("krc,kch->krh", p, vt))


def split_loops(q, k, v, lengths, *, loops: str, body_fn=None):
    """The library's split loop (256-position splits), as one or several independent loops.

    loops: ``"one"`` (the library's structure), ``"halves"`` (the work list cut in two) or
    ``"rows"`` (one loop per batch row). Returns [B, K, R, H].
    """
    S = k.shape[1]
    c = D.default_split_size(S, K, H, R)
    static = D.Static(split_size=c, scale=H**-0.5, logits_soft_cap=None, window_left=None)
    partial_fn = body_fn or D.split_partial
    qg = D.group_queries(q, B, 1, K, R, H)  # [B, K, R, H]
    first, starts, ends, total = D.work_list(lengths, 1, static, -(-S // c))

    def body(i, carry):
        state, caches = carry
        b = jnp.searchsorted(ends, i, side="right")
        j = first[b] + i - starts[b]
        start = jnp.minimum(j * c, S - c)
        zero = jnp.zeros((), jnp.int32)
        ks = jax.lax.dynamic_slice(caches[0], (b, start, zero, zero), (1, c, K, H))[0]  # [c, K, H]
        vs = jax.lax.dynamic_slice(caches[1], (b, start, zero, zero), (1, c, K, H))[0]
        part = partial_fn(qg[b], ks, vs, start + jnp.arange(c), j * c, lengths[b], 1, static)
        new = D.merge(jax.tree.map(lambda x: x[b], state), part)
        return jax.tree.map(lambda x, y: x.at[b].set(y), state, new), jax.lax.optimization_barrier(caches)

    init = D.Partial(jnp.full((B, K, R), -jnp.inf), jnp.zeros((B, K, R)), jnp.zeros((B, K, R, H)))
    if loops == "one":
        ranges = [(0, total)]
    elif loops == "halves":
        ranges = [(0, total // 2), (total // 2, total)]
    else:
        ranges = [(starts[b], ends[b]) for b in range(B)]
    states = [jax.lax.fori_loop(lo, hi, body, (init, (k, v)))[0] for lo, hi in ranges]
    return D.finish(functools.reduce(D.merge, states), jnp.float32)


def no_loop(q, k, v):
    """Every split at once, full lengths: [B, J, c, K, H] products and sums. Returns [B, K, R, H]."""
    S = k.shape[1]
    c = D.default_split_size(S, K, H, R)
    J = S // c
    qg = D.group_queries(q, B, 1, K, R, H) * H**-0.5  # [B, K, R, H]
    kk, vv = jnp.reshape(k, (B, J, c, K, H)), jnp.reshape(v, (B, J, c, K, H))
    s = jnp.sum(kk[:, :, :, :, None, :] * qg[:, None, None], axis=-1)  # [B, J, c, K, R]
    p = jnp.exp(s - jnp.max(s, axis=(1, 2))[:, None, None])  # [B, J, c, K, R]
    o = jnp.sum(p[..., None] * vv[:, :, :, :, None, :], axis=(1, 2))  # [B, K, R, H]
    return o / jnp.sum(p, axis=(1, 2))[..., None]


def hlo_facts(f, args, cache_elems: int) -> dict:
    """Temp bytes of the compiled ``f`` and its instructions with a cache-sized result."""
    compiled = f.lower(*args).compile()
    big = []
    for line in compiled.as_text().splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = (\w+)\[([\d,]*)\]\S* (\S+)\(", line)
        if not m or m.group(4) in ("parameter", "get-tuple-element", "bitcast"):
            continue
        dims = [int(d) for d in m.group(3).split(",") if d]
        if dims and int(np.prod(dims)) >= cache_elems:
            big.append(f"{m.group(1)} = {m.group(4)} {m.group(2)}{dims}")
    return {"temp_MiB": compiled.memory_analysis().temp_size_in_bytes / 2**20, "cache_sized_ops": big}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=16384)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    S = args.seq
    rng = np.random.default_rng(0)
    k, v = (jnp.asarray(rng.standard_normal((B, S, K, H), np.float32)) for _ in range(2))
    q = jnp.asarray(rng.standard_normal((B, 1, N, H), np.float32))
    lengths = jnp.full((B,), S, jnp.int32)
    decode = jax.jit(lambda q, k, v, n: jattn.decode_attention(q, k, v, lengths=n))
    paths = {"reference sum": (jax.jit(lambda a, b: jnp.sum(a) + jnp.sum(b)), (k, v))}
    for c, rows in ((256, 1), (2048, 1), (256, 8)):
        paths[f"loop of sums, c={c}, rows={rows}"] = (jax.jit(functools.partial(loop_of_sums, c=c, rows=rows)), (k, v))
    paths["decode_attention"] = (decode, (q, k, v, lengths))
    variants = {
        "idea 1: two loops (halves of the work list)": functools.partial(split_loops, loops="halves"),
        "idea 1: one loop per row (8 loops)": functools.partial(split_loops, loops="rows"),
        "idea 2: no loop, all splits batched": lambda q, k, v, n: no_loop(q, k, v),
        "body: logits reduced over H (minor axis)": functools.partial(split_loops, loops="one",
                                                                     body_fn=logits_h_minor),
        "body: head-major split copy, batched dots": functools.partial(split_loops, loops="one",
                                                                      body_fn=head_major),
    }
    reference = np.asarray(decode(q, k, v, lengths)).reshape(B, K, R, H)
    for name, fn in variants.items():
        f = jax.jit(fn)
        np.testing.assert_allclose(np.asarray(f(q, k, v, lengths)), reference, rtol=1e-4, atol=1e-4, err_msg=name)
        paths[name] = (f, (q, k, v, lengths))
    for f, a in paths.values():
        jax.block_until_ready(f(*a))  # compile
    wall = {name: float("inf") for name in paths}
    cpu = dict(wall)
    items = list(paths.items())
    load = [os.getloadavg()[0]]
    for r in range(args.rounds):  # interleaved, the order rotating each round
        for name, (f, a) in items[r % len(items):] + items[:r % len(items)]:
            start, start_cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(f(*a))
            wall[name] = min(wall[name], time.perf_counter() - start)
            cpu[name] = min(cpu[name], time.process_time() - start_cpu)
    load.append(os.getloadavg()[0])
    gigabytes = 2 * B * S * K * H * 4 / 1e9
    rows = []
    for name in paths:
        row = {"path": name, "ms": 1e3 * wall[name], "cpu_ms": 1e3 * cpu[name], "GB_per_s": gigabytes / wall[name],
               "fraction": wall["reference sum"] / wall[name], "cpu_fraction": cpu["reference sum"] / cpu[name]}
        rows.append(row)
        print(f"{name:>54}: {row['ms']:8.1f} ms (cpu {row['cpu_ms']:7.1f})  {row['GB_per_s']:6.2f} GB/s  "
              f"fraction {row['fraction']:.2f} (cpu {row['cpu_fraction']:.2f})", flush=True)
    facts = hlo_facts(decode, (q, k, v, lengths), B * S * K * H)
    print(f"decode_attention compiled: temp {facts['temp_MiB']:.1f} MiB, cache-sized ops: {facts['cache_sized_ops']}")
    out = "benchmarks/results/decode_ceiling.json"
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"command": "python benchmarks/bench_decode_ceiling.py" + ("" if S == 16384 else f" --seq {S}"),
                   "jax": jax.__version__, "cpus": os.cpu_count(), "shape": {"B": B, "S": S, "N": N, "K": K, "H": H},
                   "load_average": load,
                   "note": f"min of {args.rounds} interleaved rounds; 2-core machine shared with other jobs",
                   "decode_attention_hlo": facts, "rows": rows}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
