"""Page faults of XLA:CPU's per-call temp memory, with glibc's defaults and with three settings that remove them.

XLA:CPU allocates a call's temp buffer anew on every call. With glibc's defaults a buffer
that large is served by ``mmap`` (or from a per-thread arena that is trimmed on free), so
each call faults all of its temp pages in again: a fixed cost per call that the sparse
documents case (160 of 4096 tiles visited) pays on top of its tiles. With one arena, no
``mmap`` and no trimming (``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=4000000000``) freed memory is reused by the next call.

glibc reads these variables at start-up, so every measurement runs in a fresh child process;
the two settings alternate (``--pairs`` times each) and each call's figure is its minimum over
all of its setting's rounds. Calls (forward+backward, B=1, N=8, H=64, fp32, jitted):

- ``documents``: ``flex_attention``, T=8192, 16 documents causal inside, block 128;
- ``no_tiles``: the same call with a block mask listing no tile (the call's cost outside tiles);
- ``chunked_4096``: built-in non-causal ``'chunked'`` at T=4096, (128, 128) tiles: the per-tile
  reference of ``bench_flex.py``'s documents row;
- ``chunked_2048``: built-in non-causal ``'chunked'`` at T=2048, default tiles.

Per call: minimum and median ms, minor page faults and system CPU ms per call (``getrusage``),
compiled temp MiB. Writes ``benchmarks/results/page_faults_cpu.json`` and prints a table.

    python benchmarks/bench_page_faults.py            # about 4 minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

TUNED = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "4000000000"}
SETTINGS = {"glibc defaults": {}, "one arena, no mmap, no trim": TUNED}
T, DOCS, BLOCK = 8192, 16, 128


def _calls():
    """name -> (q, k, v gradients of sum(f(q, k, v) * w), bench_flex's ``_fwd_bwd``; its inputs);
    visited tiles of ``documents``."""
    import jattn
    from bench_flex import _doc_mask_mod, _fwd_bwd, _inputs  # N=8, H=64 there too

    docs = jattn.create_block_mask(_doc_mask_mod(T, DOCS), None, None, T, T, block_size=BLOCK)
    empty = jattn.create_block_mask(lambda b, h, q_idx, kv_idx: q_idx < 0, None, None, T, T, block_size=BLOCK)
    visited = int(docs.kv_num_blocks.sum() + docs.full_kv_num_blocks.sum())
    calls = {
        "documents": (_fwd_bwd(lambda q, k, v: jattn.flex_attention(q, k, v, block_mask=docs)), _inputs(T)),
        "no_tiles": (_fwd_bwd(lambda q, k, v: jattn.flex_attention(q, k, v, block_mask=empty)), _inputs(T)),
        "chunked_4096": (_fwd_bwd(lambda q, k, v: jattn.dot_product_attention(
            q, k, v, implementation="chunked", block_sizes=(BLOCK, BLOCK))), _inputs(T // 2)),
        "chunked_2048": (_fwd_bwd(lambda q, k, v: jattn.dot_product_attention(q, k, v, implementation="chunked")),
                         _inputs(2048)),
    }
    return calls, visited


def child(rounds: int) -> dict:
    """One process: every call compiled and warmed, then ``rounds`` interleaved rounds."""
    import jax

    calls, visited = _calls()
    out = {"visited_tiles": visited}
    for name, (g, a) in calls.items():
        out[name] = dict(temp_mib=g.temp_mib(*a), ms=[], faults=0, sys_ms=0.0)
        jax.block_until_ready(g(*a))
        jax.block_until_ready(g(*a))
    for _ in range(rounds):
        for name, (g, a) in calls.items():
            before = resource.getrusage(resource.RUSAGE_SELF)
            start = time.perf_counter()
            jax.block_until_ready(g(*a))
            out[name]["ms"].append((time.perf_counter() - start) * 1e3)
            after = resource.getrusage(resource.RUSAGE_SELF)
            out[name]["faults"] += after.ru_minflt - before.ru_minflt
            out[name]["sys_ms"] += (after.ru_stime - before.ru_stime) * 1e3
    return out


def _run_child(env: dict, rounds: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", "--rounds", str(rounds)], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"child process failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _summary(runs: list[dict]) -> dict:
    """Per call over all runs of one setting: min / median ms, faults and sys ms per call, temp."""
    rows = {}
    for name in runs[0]:
        if name == "visited_tiles":
            continue
        ms = [t for r in runs for t in r[name]["ms"]]
        calls = len(ms)
        rows[name] = dict(min_ms=min(ms), median_ms=statistics.median(ms), calls=calls,
                          faults_per_call=sum(r[name]["faults"] for r in runs) / calls,
                          sys_ms_per_call=sum(r[name]["sys_ms"] for r in runs) / calls,
                          temp_mib=runs[0][name]["temp_mib"])
    visited = runs[0]["visited_tiles"]
    for stat in ("min_ms", "median_ms"):  # bench_flex's documents per-tile ratio, forward+backward
        per_tile = rows["documents"][stat] / visited
        reference = rows["chunked_4096"][stat] / (T // 2 // BLOCK) ** 2
        rows[f"documents_per_tile_ratio_{stat[:-3]}"] = per_tile / reference
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds per child process")
    parser.add_argument("--pairs", type=int, default=2, help="child processes per setting, alternating")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "page_faults_cpu.json"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.rounds)))
        return
    from bench_flex import H, N, _commit, _cpu  # the same meta as bench_flex.py's results (this folder is on sys.path)

    import jax

    start = time.perf_counter()
    runs = {name: [] for name in SETTINGS}
    for _ in range(args.pairs):
        for name, env in SETTINGS.items():
            runs[name].append(_run_child(env, args.rounds))
    result = dict(
        meta=dict(commit=_commit(), jax=jax.__version__, **_cpu(), cpus=os.cpu_count(), T=T, docs=DOCS, block=BLOCK,
                  N=N, H=H, rounds_per_child=args.rounds, children_per_setting=args.pairs,
                  settings={name: env for name, env in SETTINGS.items()}, minutes=(time.perf_counter() - start) / 60,
                  note="forward+backward calls; each setting's children alternate with the other's"),
        settings={name: _summary(r) for name, r in runs.items()},
    )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print("| setting | call | min ms | median ms | page faults / call | sys CPU ms / call | temp MiB |")
    print("|---|---|---|---|---|---|---|")
    for setting, rows in result["settings"].items():
        for name, r in rows.items():
            if isinstance(r, dict):
                print(f"| {setting} | {name} | {r['min_ms']:.0f} | {r['median_ms']:.0f} | {r['faults_per_call']:.0f} | "
                      f"{r['sys_ms_per_call']:.0f} | {r['temp_mib']:.0f} |")
    for setting, rows in result["settings"].items():
        print(f"{setting}: documents time per visited tile / chunked's, fwd+bwd: "
              f"{rows['documents_per_tile_ratio_min']:.2f}x (min), {rows['documents_per_tile_ratio_median']:.2f}x (median)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
