"""How fast can a loop over cache splits read on XLA CPU? The ceiling behind decode_attention.

Shape glossary: B batch, S cache length, K kv heads, H head dim, c split size (positions).

``jattn.decode_attention`` visits the cache split by split in a ``lax.fori_loop`` (so that
it can skip what a row does not need). This script times, in one run and interleaved rounds
(min of the rounds; the machine may be shared), at B=8, K=8, H=128, fp32:

- ``reference sum``: a jitted sum over the whole K and V caches (the read bandwidth that
  ``benchmarks/bench_decode.py`` divides by);
- ``loop of sums, c=..., rows=...``: a ``fori_loop`` whose body only sums one split of K and
  V (``rows`` batch rows of ``c`` positions, a ``dynamic_slice`` each): any split loop's best
  case, since a decode step does more work per byte than a sum;
- ``decode_attention``: the default decode step, one new token, N=32.

Each row's fraction is the reference sum's time over its own. Writes
``benchmarks/results/decode_ceiling.json``.

    python benchmarks/bench_decode_ceiling.py            # S = 16384
    python benchmarks/bench_decode_ceiling.py --seq 4096
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import jattn  # noqa: E402

B, N, K, H = 8, 32, 8, 128


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
    paths = {"reference sum": (jax.jit(lambda a, b: jnp.sum(a) + jnp.sum(b)), (k, v))}
    for c, rows in ((256, 1), (2048, 1), (256, 8)):
        paths[f"loop of sums, c={c}, rows={rows}"] = (jax.jit(functools.partial(loop_of_sums, c=c, rows=rows)), (k, v))
    paths["decode_attention"] = (jax.jit(lambda q, k, v, n: jattn.decode_attention(q, k, v, lengths=n)),
                                 (q, k, v, lengths))
    for f, a in paths.values():
        jax.block_until_ready(f(*a))  # compile
    best = {name: float("inf") for name in paths}
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for name, (f, a) in paths.items():
            start = time.perf_counter()
            jax.block_until_ready(f(*a))
            best[name] = min(best[name], time.perf_counter() - start)
    load.append(os.getloadavg()[0])
    gigabytes = 2 * B * S * K * H * 4 / 1e9
    rows = []
    for name, t in best.items():
        row = {"path": name, "ms": 1e3 * t, "GB_per_s": gigabytes / t, "fraction": best["reference sum"] / t}
        rows.append(row)
        print(f"{name:>32}: {row['ms']:8.1f} ms  {row['GB_per_s']:6.2f} GB/s  fraction {row['fraction']:.2f}", flush=True)
    out = "benchmarks/results/decode_ceiling.json"
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"command": "python benchmarks/bench_decode_ceiling.py" + ("" if S == 16384 else f" --seq {S}"),
                   "jax": jax.__version__, "cpus": os.cpu_count(), "shape": {"B": B, "S": S, "K": K, "H": H},
                   "load_average": load, "note": f"min of {args.rounds} interleaved rounds; machine shared",
                   "rows": rows}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
