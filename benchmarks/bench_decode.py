"""Decode-step benchmark: jattn.decode_attention (contiguous and paged) against the machine's
read bandwidth, jax.nn.dot_product_attention and jattn.dot_product_attention.

Shape glossary: B batch, N query heads, K kv heads, H head dim, S cache length, one new token.

For each dtype and S: the machine's read bandwidth in the same run (a jitted fp32 sum over
float32 arrays of the K and V caches' byte size: the caches themselves in fp32, arrays of the
same bytes for bf16, so no bf16 conversion slows the reference), then the step time of every path over the same cache, timed in interleaved
rounds (min of the rounds; the machine is shared, so minima are the least noisy):

- ``decode``: ``jattn.decode_attention`` with every row at length S.
- ``ragged``: the same with lengths uniform in [S/8, S] (seeded).
- ``paged``: ``jattn.kernels.paged.paged_decode_attention`` over a pool with shuffled pages, lengths S.
- ``jax.nn`` / ``jattn.dpa``: the general paths, which read the whole cache.

Each path's process CPU time (all threads, min of the rounds) is recorded too:
``cpu_fraction_of_sum`` (the sum's CPU time over the decode step's) compares the work each
does per byte, which depends less on what else runs on the shared machine than wall time.

Achieved bandwidth = K+V bytes the step needs / step time; ``fraction`` divides it by the
sum's bandwidth. The general paths copy the whole cache each call, so from S = 32k on they
are timed in the first two rounds only (they dominate the run time). The caches are filled
with NumPy's generator (``jax.random`` at S = 64k takes minutes on 2 cores). S values whose
arrays would not fit in the free memory (3.5x the cache, 4.5x for bf16) are skipped and listed. The load
average before and after each row is recorded. Prints a table, writes
``benchmarks/results/decode_cpu.json`` and a plot of GB/s vs S with the bandwidth line.

    python benchmarks/bench_decode.py            # fp32 and bf16, S = 16k, 64k, 4k, 1k
    python benchmarks/bench_decode.py --quick    # S = 1k, 4k, two rounds
    python benchmarks/bench_decode.py --max-seq 16384   # skip S = 64k (it takes long on 2 cores)
    python benchmarks/bench_decode.py --seqs 16384,65536 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jattn
from jattn.kernels import paged

B, N, K, H = 8, 32, 8, 128


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _cache(rng, S: int, dtype):
    """[B, S, K, H] standard normal, filled row by row (no float32 copy of a bf16 cache)."""
    x = np.empty((B, S, K, H), dtype)
    for b in range(B):
        x[b] = rng.standard_normal((S, K, H), np.float32).astype(dtype)
    return jnp.asarray(x)


def _paged_pool(k, v, page_size: int, seed: int):
    """A paged cache holding the whole dense cache, its pages shuffled through the pool."""
    S = k.shape[1]
    M = -(-S // page_size)
    P = B * M
    perm = np.random.default_rng(seed).permutation(P)  # logical page i lives at pool slot perm[i]
    inverse = jnp.asarray(np.argsort(perm))
    pad = M * page_size - S
    shuffle = jax.jit(lambda x: jnp.reshape(jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))),
                                            (P, page_size, K, H))[inverse])  # [P, Ps, K, H]
    key_pages, value_pages = shuffle(k), shuffle(v)
    return paged.PagedKVCache(
        key_pages=key_pages, value_pages=value_pages,
        page_table=jnp.asarray(perm.reshape(B, M), jnp.int32),
        lengths=jnp.full((B,), S, jnp.int32), page_free=jnp.zeros((P,), bool),
        errors=jnp.zeros((B,), jnp.int32),
    )


def _time_rounds(fns: dict, rounds: int, slow=(), slow_rounds: int = 2) -> tuple[dict, dict]:
    """Time warmed fns in interleaved rounds (the order rotates each round, so no fn always
    follows the same one); min wall seconds and min process CPU seconds (all threads) each.
    The ``slow`` ones run in the first ``slow_rounds`` rounds only."""
    best = {name: float("inf") for name in fns}
    cpu = dict(best)
    items = list(fns.items())
    for r in range(rounds):
        for name, f in items[r % len(items):] + items[:r % len(items)]:
            if name in slow and r >= slow_rounds:
                continue
            start, start_cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(f())
            best[name] = min(best[name], time.perf_counter() - start)
            cpu[name] = min(cpu[name], time.process_time() - start_cpu)
    return best, cpu


def run(dtype, S: int, rounds: int, seed: int = 0) -> dict:
    itemsize = jnp.dtype(dtype).itemsize
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, 1, N, H), np.float32).astype(dtype))
    k, v = _cache(rng, S, dtype), _cache(rng, S, dtype)
    full = jnp.full((B,), S, jnp.int32)
    ragged = jnp.asarray(np.random.default_rng(seed).integers(S // 8, S + 1, size=B), jnp.int32)
    split = jattn.kernels.decode.default_split_size(S, K, H, N // K)
    cache = _paged_pool(k, v, split, seed)

    # The bandwidth reference reads float32 arrays of the caches' byte size: the caches
    # themselves in fp32; for bf16 two fp32 arrays of half the elements (a bitcast of the bf16
    # cache compiles to a widening copy on XLA CPU, and a bf16 sum spends its time converting).
    words = (k, v) if itemsize == 4 else tuple(jnp.full((B, S, K, H * itemsize // 4), 1.0, jnp.float32)
                                                for _ in range(2))
    reduce = jax.jit(lambda a, b: jnp.sum(a) + jnp.sum(b))
    decode = jax.jit(lambda q, k, v, l: jattn.decode_attention(q, k, v, lengths=l))
    over_pages = jax.jit(paged.paged_decode_attention)
    jax_nn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v))
    jattn_dpa = jax.jit(lambda q, k, v: jattn.dot_product_attention(q, k, v))
    fns = {
        "sum": lambda: reduce(*words),
        "decode": lambda: decode(q, k, v, full),
        "ragged": lambda: decode(q, k, v, ragged),
        "paged": lambda: over_pages(q, cache),
        "jax.nn": lambda: jax_nn(q, k, v),
        "jattn.dpa": lambda: jattn_dpa(q, k, v),
    }
    # The same answers first (this also compiles and warms every path): timing correct code.
    load_before = os.getloadavg()[0]
    ref = np.asarray(fns["jax.nn"](), np.float32)
    tol = 2e-2 if itemsize == 2 else 1e-4
    for name in ("decode", "paged", "jattn.dpa"):
        np.testing.assert_allclose(np.asarray(fns[name](), np.float32), ref, atol=tol, rtol=tol)
    jax.block_until_ready((fns["sum"](), fns["ragged"]()))
    slow = ("jax.nn", "jattn.dpa") if S >= 32768 else ()
    t, cpu = _time_rounds(fns, rounds, slow=slow)
    per_position = K * 2 * H * itemsize
    cache_bytes = B * S * per_position
    bw = cache_bytes / t["sum"] / 1e9
    row = {
        "dtype": jnp.dtype(dtype).name, "S": S, "split_size": split,
        "cache_MiB": cache_bytes / 2**20, "read_bw_GBps": bw,
        "ms": {name: 1e3 * sec for name, sec in t.items()},
        "cpu_ms": {name: 1e3 * sec for name, sec in cpu.items()},
        "decode_GBps": cache_bytes / t["decode"] / 1e9,
        "ragged_GBps": int(ragged.sum()) * per_position / t["ragged"] / 1e9,
        "paged_GBps": cache_bytes / t["paged"] / 1e9,
        "ragged_token_fraction": float(ragged.sum()) / (B * S),
        "load_avg_before_after": [load_before, os.getloadavg()[0]],
        "peer_rounds": 2 if slow else rounds,
    }
    row["fraction_of_bw"] = row["decode_GBps"] / bw
    row["cpu_fraction_of_sum"] = cpu["sum"] / cpu["decode"]  # CPU work per byte against the sum's
    row["ragged_over_full"] = t["ragged"] / t["decode"]
    row["paged_over_contiguous"] = t["paged"] / t["decode"]
    row["speedup_vs_jax_nn"] = t["jax.nn"] / t["decode"]
    row["speedup_vs_jattn_dpa"] = t["jattn.dpa"] / t["decode"]
    return row


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in rows})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4), squeeze=False)
    for ax, dt in zip(axes[0], dtypes):
        rs = sorted((r for r in rows if r["dtype"] == dt), key=lambda r: r["S"])
        S = [r["S"] for r in rs]
        ax.plot(S, [r["read_bw_GBps"] for r in rs], "k--", label="read bandwidth (jitted sum, same run)")
        ax.plot(S, [r["decode_GBps"] for r in rs], "o-", label="decode_attention")
        ax.plot(S, [r["ragged_GBps"] for r in rs], "s-", label="decode_attention, ragged")
        ax.plot(S, [r["paged_GBps"] for r in rs], "^-", label="paged_decode_attention")
        for name in ("jax.nn", "jattn.dpa"):
            ax.plot(S, [r["cache_MiB"] * 2**20 / (r["ms"][name] / 1e3) / 1e9 for r in rs], ":", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("S (cache length)")
        ax.set_ylabel("GB/s of K+V read")
        ax.set_title(f"decode step, {dt}, B={B} N={N} K={K} H={H}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="S = 1k, 4k and two rounds")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--max-seq", type=int, default=65536, help="skip longer caches (time)")
    parser.add_argument("--seqs", default="16384,65536,4096,1024",
                        help="cache lengths S, comma-separated (longest targets first: a run cut short keeps them)")
    parser.add_argument("--out", default="benchmarks/results/decode_cpu.json")
    args = parser.parse_args()
    seqs = [S for S in ([1024, 4096] if args.quick else [int(x) for x in args.seqs.split(",")]) if S <= args.max_seq]
    rounds = 2 if args.quick else args.rounds
    rows, skipped = [], []

    def write():  # after every row: a run cut short still leaves its results
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"command": "python benchmarks/" + os.path.basename(__file__) + " " + " ".join(sys.argv[1:]),
                       "shape": {"B": B, "N": N, "K": K, "H": H, "Tq": 1}, "rounds": rounds,
                       "jax": jax.__version__, "cpus": os.cpu_count(),
                       "note": "2-core machine shared with other jobs (see load_avg_before_after per row); min over interleaved rounds",
                       "rows": rows, "skipped": skipped}, f, indent=1)
        if rows:
            _plot(rows, args.out.replace(".json", ".png"))

    header = (f"{'dtype':>8} {'S':>6} {'bw GB/s':>8} {'decode ms':>9} {'GB/s':>6} {'frac':>5} {'cpu frac':>8} "
              f"{'ragged/full':>11} {'paged/contig':>12} {'vs jax.nn':>9} {'vs jattn.dpa':>12}")
    print(f"B={B} N={N} K={K} H={H}, one new token; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs (shared with other jobs: timings are noisy)")
    print(header)
    for S in seqs:  # S-major: a run cut short still has both dtypes at the lengths it reached
        for name in args.dtypes.split(","):
            dtype = jnp.dtype(name)
            need = (3.5 if dtype.itemsize == 4 else 4.5) * B * S * K * 2 * H * dtype.itemsize
            if need > _available_bytes():
                skipped.append({"dtype": name, "S": S, "needs_GiB": need / 2**30,
                                "available_GiB": _available_bytes() / 2**30})
                print(f"{name:>8} {S:>6} skipped: needs {need / 2**30:.1f} GiB, "
                      f"{_available_bytes() / 2**30:.1f} GiB available")
                write()
                continue
            r = run(dtype, S, rounds)
            rows.append(r)
            print(f"{name:>8} {S:>6} {r['read_bw_GBps']:>8.2f} {r['ms']['decode']:>9.1f} "
                  f"{r['decode_GBps']:>6.2f} {r['fraction_of_bw']:>5.2f} {r['cpu_fraction_of_sum']:>8.2f} "
                  f"{r['ragged_over_full']:>11.2f} "
                  f"{r['paged_over_contiguous']:>12.2f} {r['speedup_vs_jax_nn']:>8.2f}x "
                  f"{r['speedup_vs_jattn_dpa']:>11.2f}x", flush=True)
            write()
    print(f"wrote {args.out} and {args.out.replace('.json', '.png')}")


if __name__ == "__main__":
    main()
