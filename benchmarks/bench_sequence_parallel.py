"""Ring vs Ulysses sequence parallelism on 8 simulated CPU devices: time, per-device temp memory
and bytes each device sends, for one jitted forward+backward (causal, zig-zag, fp32).

    flock /tmp/jattn-bench.lock python benchmarks/bench_sequence_parallel.py
    python benchmarks/bench_sequence_parallel.py --target-memory   # the issue-11 memory target only

Memory is the compiled ``temp_size_in_bytes`` (per device under SPMD). Bytes sent come from the
compiled HLO: every collective-permute sends its whole result, an all-to-all the (P-1)/P of its
result that leaves the device, an all-gather / all-reduce its result; ops inside while loops
count once per iteration (XLA's known_trip_count). Times are the minimum of ``--repeats`` runs
of the ahead-of-time compiled step (no compile inside), strategies interleaved; ``--no-time``
skips them. The 8 "devices" share the host's cores, so times measure total work, not a
cluster's wall clock. Writes benchmarks/results/sequence_parallel_cpu.json.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jattn  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results", "sequence_parallel_cpu.json")
_BYTES = {"f32": 4, "f64": 8, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s64": 8}
_SHAPE = re.compile(r"\b(f32|f64|bf16|f16|s32|u32|pred|s64)\[([0-9,]*)\]")
_OPS = ("collective-permute", "all-to-all", "all-gather", "all-reduce")


def _shape_bytes(text: str) -> int:
    return sum(_BYTES[t] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
               for t, dims in _SHAPE.findall(text))


def hlo_bytes_sent(hlo: str, num_devices: int) -> dict[str, int]:
    """Bytes one device sends per call, by collective kind, with while-loop trip counts."""
    comps, current, body = {}, None, []
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%([^ ]+) .*\{$", line)
        if head:
            current, body = head.group(1), []
            comps[current] = body
        elif current is not None:
            body.append(line)
    entry = re.search(r"^ENTRY %([^ ]+)", hlo, re.M).group(1)
    mult = {entry: 1}
    order = [entry]
    while order:  # propagate execution counts down the call graph
        name = order.pop()
        for line in comps.get(name, []):
            trip = re.search(r'known_trip_count":\{"n":"(\d+)"', line)
            for kind, callee in re.findall(r"(body|condition|to_apply|calls|true_computation|false_computation)=%([^ ,}]+)", line) + [
                ("branch", c) for group in re.findall(r"branch_computations=\{([^}]*)\}", line) for c in re.findall(r"%([^ ,]+)", group)
            ]:
                n = mult[name] * (int(trip.group(1)) if trip and kind in ("body", "condition") else 1)
                if callee in comps:
                    mult[callee] = mult.get(callee, 0) + n
                    order.append(callee)
    sent = {op: 0 for op in _OPS}
    seen = set()
    for name, lines in comps.items():
        if name not in mult or name in seen:
            continue
        seen.add(name)
        for line in lines:
            m = re.match(r"\s*(?:ROOT )?%[^ ]+ = (.*?) (" + "|".join(_OPS) + r")(?:-start)?\(", line)
            if m:
                b = _shape_bytes(m.group(1))
                if m.group(2) == "all-to-all":
                    b = b * (num_devices - 1) // num_devices
                sent[m.group(2)] += b * mult[name]
    return sent


def build(strategy: str, T: int, N: int, K: int, H: int, mesh):
    q = jax.ShapeDtypeStruct((1, T, N, H), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, T, K, H), jnp.float32)

    def loss(q, k, v):
        out = jattn.sequence_parallel_attention(
            q, k, v, mesh=mesh, axis_name="s", layout="zigzag", is_causal=True, strategy=strategy)
        return jnp.sum(out)

    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile()
    return compiled


def target_memory():
    """Issue 11: B=1, N=4, H=64, fp32, causal, zig-zag, fwd+bwd; T=65536 on 8 devices vs 'chunked' at 8192."""
    ring = build("ring", 65536, 4, 4, 64, jax.make_mesh((8,), ("s",))).memory_analysis().temp_size_in_bytes
    one = build("ring", 8192, 4, 4, 64, jax.make_mesh((1,), ("s",), devices=jax.devices()[:1]))
    q = jax.ShapeDtypeStruct((1, 8192, 4, 64), jnp.float32)
    chunked = jax.jit(jax.value_and_grad(
        lambda q, k, v: jnp.sum(jattn.dot_product_attention(q, k, v, is_causal=True, implementation="chunked")),
        argnums=(0, 1, 2))).lower(q, q, q).compile().memory_analysis().temp_size_in_bytes
    return {
        "config": "B=1, N=4, H=64, fp32, causal, zigzag, forward+backward, compiled temp bytes per device",
        "ring_P8_T65536": int(ring),
        "ring_P1_T8192": int(one.memory_analysis().temp_size_in_bytes),
        "chunked_T8192": int(chunked),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--target-memory", action="store_true")
    p.add_argument("--no-time", action="store_true")
    args = p.parse_args()
    target = target_memory()
    mib = lambda b: b / 2**20
    print(f"memory target: ring P=8 T=65536 {mib(target['ring_P8_T65536']):.1f} MiB, ring P=1 T=8192 "
          f"{mib(target['ring_P1_T8192']):.1f} MiB, 'chunked' T=8192 {mib(target['chunked_T8192']):.1f} MiB")
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, 8 simulated "
                         "XLA CPU devices sharing them; shared with other jobs while measured (times noisy)",
              "jax": jax.__version__, "memory_target": target, "rows": []}
    if not args.target_memory:
        mesh = jax.make_mesh((8,), ("s",))
        N, K, H = args.heads, args.kv_heads, args.head_dim
        for T in args.lengths:
            rng = np.random.default_rng(0)
            q = jnp.asarray(rng.standard_normal((1, T, N, H), np.float32))
            kv = jnp.asarray(rng.standard_normal((1, T, K, H), np.float32))
            compiled = {s: build(s, T, N, K, H, mesh) for s in ("ring", "ulysses")}
            times = {s: [] for s in compiled}
            with jax.set_mesh(mesh):
                for _ in range(0 if args.no_time else args.repeats):
                    for s, c in compiled.items():  # interleaved
                        t = time.perf_counter()
                        jax.block_until_ready(c(q, kv, kv))
                        times[s].append(time.perf_counter() - t)
            for s, c in compiled.items():
                sent = hlo_bytes_sent(c.as_text(), 8)
                plan = jattn.explain_sequence_parallel(q, kv, kv, mesh=mesh, axis_name="s", layout="zigzag",
                                                       is_causal=True, strategy=s)
                estimate = plan.ring_bytes if s == "ring" else plan.ulysses_bytes
                row = {"strategy": s, "T": T, "N": N, "K": K, "H": H, "P": 8, "seconds": min(times[s], default=None),
                       "all_seconds": times[s], "temp_bytes_per_device": int(c.memory_analysis().temp_size_in_bytes),
                       "bytes_sent_per_device": sum(sent.values()), "bytes_sent_by_op": sent,
                       "bytes_estimated_by_explain_sequence_parallel": estimate}
                report["rows"].append(row)
                secs = "-" if row["seconds"] is None else f"{row['seconds']:.2f}"
                print(f"T={T:6d} {s:8s} {secs:>8s} s  temp {mib(row['temp_bytes_per_device']):8.1f} MiB  "
                      f"sent {mib(row['bytes_sent_per_device']):8.1f} MiB/device  {sent}", flush=True)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(report, f, indent=1)
    print("wrote", RESULTS)


if __name__ == "__main__":
    main()
