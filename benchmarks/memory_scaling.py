"""Compiled temp memory of jitted forward+backward vs sequence length (nothing is run).

    python benchmarks/memory_scaling.py            # T in {2048, 4096, 8192, 16384, 32768}

fp32, B=1, N=8, H=64, ``implementation=None`` (the default choice) and, for contrast,
``jax.nn.dot_product_attention`` up to T=8192. Prints MiB per T and the growth per doubling,
and writes them to ``benchmarks/results/memory_scaling.json``. Compile-only, so the numbers do
not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp

import jattn


def temp_mib(fn, T: int, causal: bool) -> float:
    x = jax.ShapeDtypeStruct((1, T, 8, 64), jnp.float32)
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, is_causal=causal)), argnums=(0, 1, 2)))
    return grad.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes / 2**20


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    p.add_argument("--max-dense-len", type=int, default=8192)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "memory_scaling.json"))
    args = p.parse_args()
    records = []
    print(f"{'impl':12s} {'causal':>6s} " + " ".join(f"{T:>9d}" for T in args.lengths) + "   (MiB)")
    for name, fn, limit in (("jattn", jattn.dot_product_attention, None),
                            ("jax.nn", jax.nn.dot_product_attention, args.max_dense_len)):
        for causal in (False, True):
            sizes = [temp_mib(fn, T, causal) if limit is None or T <= limit else float("nan")
                     for T in args.lengths]
            growth = [b / a for a, b in zip(sizes, sizes[1:])]
            print(f"{name:12s} {str(causal):>6s} " + " ".join(f"{s:9.1f}" for s in sizes)
                  + "   growth per doubling: " + ", ".join(f"{g:.2f}" for g in growth))
            records.append({"impl": name, "causal": causal, "lengths": args.lengths,
                            "temp_mib": [None if s != s else round(s, 1) for s in sizes],
                            "growth_per_doubling": [None if g != g else round(g, 2) for g in growth]})
    report = {"jax": jax.__version__, "backend": jax.default_backend(), "B": 1, "N": 8, "H": 64,
              "dtype": "float32", "what": "compiled temp memory of jitted forward+backward (MiB)",
              "records": records}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
