"""Time ``dot_product_attention(implementation='chunked')`` of one or more jattn checkouts, interleaved.

Shape glossary: B batch, T query length (= S), N heads, H head dim.

For each checkout (a directory holding a ``jattn`` package) and each case (causal or not,
forward or forward+backward), a fresh subprocess per round compiles the jitted call and
reports the minimum wall time of ``--repeats`` runs; rounds alternate between checkouts so
machine load hits them alike. Prints min over rounds per cell and the ratio to the first
checkout; writes JSON.

    python benchmarks/bench_chunked.py --checkout new=. --checkout old=/tmp/jattn_old --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_CHILD = r"""
import json, sys, time
import jax, jax.numpy as jnp
import jattn
T, B, N, H, causal, bwd, repeats = json.loads(sys.argv[1])
ks = jax.random.split(jax.random.key(0), 3)
q, k, v = (jax.random.normal(kk, (B, T, N, H), jnp.float32) for kk in ks)
f = lambda q, k, v: jattn.dot_product_attention(q, k, v, is_causal=causal, implementation="chunked")
if bwd:
    fn = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v)), (0, 1, 2)))
else:
    fn = jax.jit(f)
jax.block_until_ready(fn(q, k, v))
best = float("inf")
for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(q, k, v))
    best = min(best, time.perf_counter() - t0)
print(json.dumps(best))
"""


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--checkout", action="append", required=True, help="name=path of a directory holding jattn/")
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--N", type=int, default=8)
    p.add_argument("--H", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "chunked_unified.json"))
    args = p.parse_args()
    checkouts = [c.split("=", 1) for c in args.checkout]
    cases = [(c, b) for c in (False, True) for b in (False, True)]
    times = {(name, c, b): [] for name, _ in checkouts for c, b in cases}
    for r in range(args.rounds):
        for c, b in cases:
            for name, path in (checkouts if r % 2 == 0 else checkouts[::-1]):
                env = dict(os.environ, PYTHONPATH=os.path.abspath(path))
                cfg = json.dumps([args.T, args.B, args.N, args.H, c, b, args.repeats])
                out = subprocess.run([sys.executable, "-c", _CHILD, cfg], env=env, capture_output=True, text=True)
                if out.returncode:  # e.g. killed on a crowded machine: say so, keep the other samples
                    print(f"round {r} {name} causal={c} bwd={b} failed:\n{out.stderr[-2000:]}", flush=True)
                    continue
                times[(name, c, b)].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"round {r} {name:8s} causal={c!s:5s} {'fwd+bwd' if b else 'fwd':7s} "
                      f"{times[(name, c, b)][-1] * 1e3:8.1f} ms", flush=True)
    rows = []
    print(f"\nT={args.T} B={args.B} N={args.N} H={args.H} fp32, min over {args.rounds} rounds (ms); ratio to {checkouts[0][0]}")
    for c, b in cases:
        base = min(times[(checkouts[0][0], c, b)])
        for name, _ in checkouts:
            t = min(times[(name, c, b)])
            rows.append(dict(checkout=name, causal=c, backward=b, min_s=t, all_s=times[(name, c, b)], ratio=t / base))
            print(f"causal={c!s:5s} {'fwd+bwd' if b else 'fwd':7s} {name:8s} {t * 1e3:8.1f}  x{t / base:.3f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(dict(T=args.T, B=args.B, N=args.N, H=args.H, dtype="float32", rows=rows,
                       note="shared 2-core CPU; interleaved rounds, min per cell"), fh, indent=1)


if __name__ == "__main__":
    main()
