"""Sweep for the automatic choice's threshold: jattn's 'xla', 'chunked' and default against jax.nn.

Shape glossary: B batch, T query length (= S key length), N heads, H head dim.

For T in 128..2048 (128, 256, 512, 768, 1024, 2048 by default), causal and not, three modes: the forward pass; forward+backward with the
loss ``jnp.sum(out)`` (an all-ones cotangent, which XLA may simplify); forward+backward with a
fixed random cotangent (``jnp.sum(out * ct)``). Gradients are taken for q, k and v.

Timing on a shared machine: every implementation of one point is compiled first, then timed in
rounds (``--rounds`` x max(1, 1024 / T): short calls are noisy and cheap, so T = 128 gets 8x
the rounds of T >= 1024); in each round every implementation runs ``--calls`` times back to
back (its time in the round: the fastest call), default right next to jax.nn, in an order that alternates between
rounds (forward, then reversed) so that none always runs first or last. Ratios are PAIRED per round: ``jax.nn time / jattn
time`` from the same round (above 1 = jattn faster), so a load spike that slows one round slows
both sides of its ratio; the JSON reports the median over rounds and the spread (min, max), and
the min-of-all-rounds milliseconds.

    python benchmarks/threshold_sweep.py            # writes benchmarks/results/threshold_sweep.json
    python benchmarks/threshold_sweep.py --quick    # T 256, 1024 only

The check the default must pass: at every point, the median paired ratio default/jax.nn >= 1/1.1
(default time <= 1.1 x jax.nn time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import jattn
from jattn import dispatch

B, N, H = 1, 8, 64
MODES = ("fwd", "fwd+bwd:sum", "fwd+bwd:random")


def _attention_fns():
    """name -> fn(q, k, v, causal) over [B, T, N, H]."""
    return {
        "default": lambda q, k, v, c: jattn.dot_product_attention(q, k, v, is_causal=c),
        "xla": lambda q, k, v, c: jattn.dot_product_attention(q, k, v, is_causal=c, implementation="xla"),
        "chunked": lambda q, k, v, c: jattn.dot_product_attention(q, k, v, is_causal=c, implementation="chunked"),
        "jax.nn": lambda q, k, v, c: jax.nn.dot_product_attention(q, k, v, is_causal=c, implementation="xla"),
    }


def _program(fn, mode: str, causal: bool):
    """A jitted callable of (q, k, v, ct) for one mode."""
    if mode == "fwd":
        return jax.jit(lambda q, k, v, ct: fn(q, k, v, causal))
    if mode == "fwd+bwd:sum":
        loss = lambda q, k, v: jnp.sum(fn(q, k, v, causal))  # noqa: E731
    else:
        loss = lambda q, k, v, ct: jnp.sum(fn(q, k, v, causal) * ct)  # noqa: E731
        grad = jax.grad(loss, argnums=(0, 1, 2))
        return jax.jit(grad)
    grad = jax.grad(loss, argnums=(0, 1, 2))
    return jax.jit(lambda q, k, v, ct: grad(q, k, v))


def rounds_for(T: int, rounds: int) -> int:
    """More rounds where one call is short: ``rounds`` x max(1, 1024 // T)."""
    return rounds * max(1, 1024 // T)


def _point(T: int, causal: bool, mode: str, rounds: int, calls: int) -> dict:
    rng = np.random.default_rng(T)
    q, k, v, ct = (jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32) for _ in range(4))
    programs = {name: _program(fn, mode, causal) for name, fn in _attention_fns().items()}
    for prog in programs.values():
        jax.block_until_ready(prog(q, k, v, ct))  # compile + warm up
    names = ["default", "jax.nn", "xla", "chunked"]  # default next to jax.nn in either order
    per_round = {name: [] for name in names}  # the fastest of ``calls`` calls, per round
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):  # alternate the order between rounds
            prog, fastest = programs[name], float("inf")
            for _ in range(calls):
                start = time.perf_counter()
                jax.block_until_ready(prog(q, k, v, ct))
                fastest = min(fastest, time.perf_counter() - start)
            per_round[name].append(fastest)
    choice = jattn.explain_implementation(q, k, v, is_causal=causal).implementation
    record = {"T": T, "causal": causal, "mode": mode, "default_choice": choice, "rounds": rounds,
              "ms": {name: 1e3 * min(ts) for name, ts in per_round.items()}}
    for name in ("default", "xla", "chunked"):
        ratios = np.asarray(per_round["jax.nn"]) / np.asarray(per_round[name])  # paired, per round
        record[f"{name}_vs_jax_nn"] = float(np.median(ratios))
        record[f"{name}_vs_jax_nn_spread"] = [float(ratios.min()), float(ratios.max())]
    return record


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 768, 1024, 2048])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "threshold_sweep.json"))
    args = p.parse_args()
    if args.quick:
        args.lengths, args.rounds = [256, 1024], 3

    print(f"jax {jax.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{jax.default_backend()}; fp32 B={B} N={N} H={H}; CHUNKED_MIN_TS={dispatch.CHUNKED_MIN_TS} "
          f"(dense: {dispatch.CHUNKED_MIN_TS_DENSE}); "
          f"{args.rounds} rounds (x 1024/T below T=1024) x {args.calls} calls, order alternating; "
          "ratios: median of per-round pairs [min, max]")
    header = f"{'T':>5s} {'causal':>6s} {'mode':>15s} {'choice':>8s} " + " ".join(
        f"{n:>9s}" for n in ("default", "xla", "chunked", "jax.nn")) + "  default/jax.nn [spread]    xla  chunked  (x jax.nn speed)"
    print(header)
    records = []

    def write(complete: bool):
        ok = all(r["default_vs_jax_nn"] >= 1 / 1.1 for r in records)
        report = {
            "machine": {"jax": jax.__version__, "cpu": platform.processor() or platform.machine(),
                        "cores": os.cpu_count(), "backend": jax.default_backend(), "shared": True,
                        "load_average_at_end": round(os.getloadavg()[0], 1)},
            "settings": {"B": B, "N": N, "H": H, "dtype": "float32", "rounds": args.rounds,
                         "rounds_rule": "rounds x max(1, 1024 // T)", "calls": args.calls,
                         "statistic": "ratios: median (and min, max) over rounds of per-round paired ratios; "
                                      "ms: min over all rounds", "chunked_min_ts": dispatch.CHUNKED_MIN_TS,
                         "chunked_min_ts_dense": dispatch.CHUNKED_MIN_TS_DENSE},
            "complete": complete,
            "records": records,
            "default_never_10pct_slower": ok,
        }
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        return ok

    for T in args.lengths:
        for causal in (False, True):
            for mode in MODES:
                r = _point(T, causal, mode, rounds_for(T, args.rounds), args.calls)
                records.append(r)
                ms = r["ms"]
                lo, hi = r["default_vs_jax_nn_spread"]
                print(f"{T:5d} {str(causal):>6s} {mode:>15s} {r['default_choice']:>8s} "
                      + " ".join(f"{ms[n]:9.2f}" for n in ("default", "xla", "chunked", "jax.nn"))
                      + f"  {r['default_vs_jax_nn']:14.2f} [{lo:.2f}, {hi:.2f}] {r['xla_vs_jax_nn']:6.2f} "
                      f"{r['chunked_vs_jax_nn']:8.2f}",
                      flush=True)
                write(complete=False)
    worst = min(records, key=lambda r: r["default_vs_jax_nn"])
    ok = write(complete=True)
    print(f"worst default point: T={worst['T']} causal={worst['causal']} {worst['mode']}: "
          f"{worst['default_vs_jax_nn']:.2f}x jax.nn; never >10% slower than jax.nn: {ok}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
