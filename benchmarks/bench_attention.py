"""Benchmark jattn's implementations against jax.nn and Flax attention.

Shape glossary: B batch, T query length (= S key length here), N heads, H head dim.

For each T (causal and not) and each implementation: median wall time of the jitted forward
and forward+backward (grads of q, k, v), attention GFLOP/s, that rate as a fraction of a
plain matmul with the same FLOP count timed in the same run, and the compiled temp memory
(``memory_analysis().temp_size_in_bytes``). Prints a table, writes JSON and a PNG plot.

FLOPs: forward 4·B·N·T·S·H (two matmuls), forward+backward 3.5× that (FlashAttention-2's
count); causal counts half. The matmul reference is one [n, n] @ [n, n] with 2n³ equal to the
call's FLOPs.

    python benchmarks/bench_attention.py            # CPU: fp32, B=1, N=8, H=64, T 512..8192
    python benchmarks/bench_attention.py --quick    # T 512, 1024 only, one repeat
    python benchmarks/bench_attention.py --gpu      # bf16, H 64/128, T 1k..16k, with cuDNN
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jattn


def _implementations(gpu: bool):
    """name -> fn(q, k, v, is_causal) over [B, T, N, H] arrays."""
    impls = {
        "jattn:auto": lambda q, k, v, c: jattn.dot_product_attention(q, k, v, is_causal=c),
        "jattn:xla": lambda q, k, v, c: jattn.dot_product_attention(q, k, v, is_causal=c, implementation="xla"),
        "jattn:chunked": lambda q, k, v, c: jattn.dot_product_attention(
            q, k, v, is_causal=c, implementation="chunked"),
        "jax.nn:xla": lambda q, k, v, c: jax.nn.dot_product_attention(q, k, v, is_causal=c, implementation="xla"),
        "flax.nnx": lambda q, k, v, c: nnx.dot_product_attention(q, k, v, is_causal=c),
    }
    if gpu:
        impls["jattn:cudnn"] = lambda q, k, v, c: jattn.dot_product_attention(
            q, k, v, is_causal=c, implementation="cudnn")
        impls["jax.nn:cudnn"] = lambda q, k, v, c: jax.nn.dot_product_attention(
            q, k, v, is_causal=c, implementation="cudnn")
    return impls


def _time(fn, args, repeats: int) -> float:
    """Median seconds of ``fn(*args)`` after compiling and one timed warm-up run.

    At least ``repeats`` runs, more for fast calls (up to about one second, 50 runs); a call
    slower than 3 s is timed once (the warm-up run).
    """
    jax.block_until_ready(fn(*args))  # compile
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    if first > 3.0:
        return first
    repeats = max(repeats, min(50, int(1.0 / max(first, 1e-4))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _matmul_rate(flops: float, dtype, repeats: int) -> float:
    """GFLOP/s of one square matmul with about ``flops`` FLOPs."""
    n = max(64, int(round((flops / 2) ** (1 / 3))))
    a = jnp.ones((n, n), dtype)
    mm = jax.jit(lambda x, y: x @ y)
    return 2 * n**3 / _time(mm, (a, a), repeats) / 1e9


def _temp_mib(jitted, args) -> float:
    return jitted.lower(*args).compile().memory_analysis().temp_size_in_bytes / 2**20


def run(lengths, head_dims, dtype, batch, heads, repeats, gpu, only, max_dense_len):
    impls = _implementations(gpu)
    if only:
        impls = {k: v for k, v in impls.items() if k in only}
    dense = {"jattn:xla", "jax.nn:xla", "flax.nnx"}  # materialise [B, N, T, S]
    rng = np.random.default_rng(0)
    records = []
    for H in head_dims:
        for T in lengths:
            q, k, v = (jnp.asarray(rng.normal(size=(batch, T, heads, H)), dtype) for _ in range(3))
            for causal in (False, True):
                fwd_flops = 4 * batch * heads * T * T * H * (0.5 if causal else 1.0)
                rates = {"fwd": _matmul_rate(fwd_flops, dtype, repeats),
                         "fwd+bwd": _matmul_rate(3.5 * fwd_flops, dtype, repeats)}
                auto = jattn.explain_implementation(q, k, v, is_causal=causal).implementation
                for name, f in impls.items():
                    if name in dense and T > max_dense_len:
                        continue
                    fwd = jax.jit(lambda q, k, v, f=f: f(q, k, v, causal))
                    bwd = jax.jit(jax.grad(
                        lambda q, k, v, f=f: jnp.sum(f(q, k, v, causal).astype(jnp.float32) ** 2),
                        argnums=(0, 1, 2)))
                    for mode, fn, flops in (("fwd", fwd, fwd_flops), ("fwd+bwd", bwd, 3.5 * fwd_flops)):
                        seconds = _time(fn, (q, k, v), repeats)
                        gflops = flops / seconds / 1e9
                        rec = dict(impl=name, mode=mode, T=T, H=H, causal=causal, dtype=str(jnp.dtype(dtype)),
                                   ms=seconds * 1e3, gflops=gflops, matmul_gflops=rates[mode],
                                   frac_matmul=gflops / rates[mode], temp_mib=_temp_mib(fn, (q, k, v)),
                                   auto_picks=auto)
                        records.append(rec)
                        print(_row(rec), flush=True)
    return records


HEADER = (f"{'impl':14s} {'mode':8s} {'T':>6s} {'H':>4s} {'causal':>6s} {'ms':>10s} {'GFLOP/s':>8s} "
          f"{'matmul':>7s} {'frac':>5s} {'temp MiB':>9s} {'vs jax.nn':>9s}")


def _row(r, ref=None):
    ratio = "" if ref is None else f"{ref['ms'] / r['ms']:8.2f}x"
    return (f"{r['impl']:14s} {r['mode']:8s} {r['T']:6d} {r['H']:4d} {str(r['causal']):>6s} {r['ms']:10.1f} "
            f"{r['gflops']:8.1f} {r['matmul_gflops']:7.0f} {r['frac_matmul']:5.2f} {r['temp_mib']:9.1f} {ratio:>9s}")


def table(records, baseline: str) -> str:
    """All rows, sorted, with each row's speed-up over ``baseline`` (same T, H, causal, mode)."""
    key = lambda r: (r["H"], r["causal"], r["mode"], r["T"])
    refs = {key(r): r for r in records if r["impl"] == baseline}
    lines = [HEADER]
    for r in sorted(records, key=lambda r: key(r) + (r["impl"],)):
        lines.append(_row(r, refs.get(key(r))))
    return "\n".join(lines)


def plot(records, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["H"], r["causal"], r["mode"]) for r in records})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (H, causal, mode) in zip(axes[0], panels):
        for impl in sorted({r["impl"] for r in records}):
            rs = sorted((r for r in records if (r["impl"], r["H"], r["causal"], r["mode"]) == (impl, H, causal, mode)),
                        key=lambda r: r["T"])
            if rs:
                ax.plot([r["T"] for r in rs], [r["ms"] for r in rs], marker="o", label=impl)
        ax.set(xscale="log", yscale="log", xlabel="T", ylabel="ms (median)",
               title=f"{mode}, H={H}, {'causal' if causal else 'full'}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="T in {512, 1024}, one repeat")
    p.add_argument("--gpu", action="store_true", help="bf16, H in {64, 128}, T 1k..16k, add cuDNN")
    p.add_argument("--lengths", type=int, nargs="+", help="override the sequence lengths")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", nargs="+", help="run only these implementations")
    p.add_argument("--max-dense-len", type=int, default=8192,
                   help="skip the [T, S]-materialising paths above this T (memory)")
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args()

    if args.gpu:
        lengths, head_dims, dtype, tag = [1024, 2048, 4096, 8192, 16384], [64, 128], jnp.bfloat16, "gpu"
    else:
        lengths, head_dims, dtype, tag = [512, 1024, 2048, 4096, 8192], [64], jnp.float32, "cpu"
    repeats = args.repeats
    if args.quick:
        lengths, repeats, tag = lengths[:2], 1, tag + "_quick"
    lengths = args.lengths or lengths

    machine = f"{_cpu_name()}, {os.cpu_count()} cores, {jax.devices()[0].device_kind}"
    print(f"jax {jax.__version__} on {machine}; dtype {jnp.dtype(dtype)}, B=1, N=8", flush=True)
    print(HEADER, flush=True)
    records = run(lengths, head_dims, dtype, 1, 8, repeats, args.gpu, args.only, args.max_dense_len)
    print("\n" + table(records, "jax.nn:xla"))

    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"attention_{tag}")
    with open(stem + ".json", "w") as f:
        json.dump(dict(machine=machine, jax=jax.__version__, records=records), f, indent=1)
    plot(records, stem + ".png")
    print(f"wrote {stem}.json and {stem}.png")


if __name__ == "__main__":
    main()
