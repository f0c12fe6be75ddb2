"""Tokens/s of the toy model's greedy decoding (``jattn.toy.train.decode``), before and after
the decode fast path, in one run.

"before": the module's general decode path (``attention_fn`` over the whole fixed cache with
a [T, L] mask), forced by passing a copy of the default ``attention_fn``. "after": the default,
which sends plain causal decode steps through ``jattn.decode_attention``. Same parameters,
same prompts; the generated tokens must be equal. Interleaved rounds, min per path (the
machine is shared). Writes ``benchmarks/results/toy_decode.json``.

    python benchmarks/bench_toy_decode.py
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from configs.copy import get_config  # noqa: E402
from jattn.flax_attention_fn import flax_attention_fn  # noqa: E402
from jattn.toy import train  # noqa: E402
from jattn.toy.model import create_model  # noqa: E402

# (name, batch, prompt length, new tokens): the trainer's own evaluation, then a long prompt.
SETTINGS = [("eval (copy task)", 512, 12, 10), ("long prompt", 8, 2048, 32)]


def main():
    config = get_config()
    params = nnx.state(create_model(config, nnx.Rngs(params=0)), nnx.Param)
    paths = {
        "before": train.model_graphdef(config, attention_fn=functools.partial(flax_attention_fn)),
        "after": train.model_graphdef(config),
    }
    rows = []
    for name, B, P, new in SETTINGS:
        prompt = jnp.asarray(np.random.default_rng(0).integers(3, config.vocab_size, size=(B, P)), jnp.int32)
        fns = {k: jax.jit(functools.partial(train.decode, graphdef=g, num_new=new)) for k, g in paths.items()}
        outs = {k: np.asarray(f(params, prompt)) for k, f in fns.items()}  # compile
        same = bool(np.array_equal(outs["before"], outs["after"]))
        best = {k: float("inf") for k in fns}
        for _ in range(5):
            for k, f in fns.items():
                start = time.perf_counter()
                jax.block_until_ready(f(params, prompt))
                best[k] = min(best[k], time.perf_counter() - start)
        row = {"setting": name, "batch": B, "prompt": P, "new_tokens": new, "same_tokens": same,
               "tokens_per_s": {k: B * new / t for k, t in best.items()},
               "ms": {k: 1e3 * t for k, t in best.items()}}
        row["speedup"] = best["before"] / best["after"]
        rows.append(row)
        print(f"{name:>18}: B={B} prompt={P} new={new}  before {row['tokens_per_s']['before']:,.0f} tok/s  "
              f"after {row['tokens_per_s']['after']:,.0f} tok/s  ({row['speedup']:.2f}x, same tokens: {same})",
              flush=True)
    out = "benchmarks/results/toy_decode.json"
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"command": "python benchmarks/bench_toy_decode.py", "jax": jax.__version__,
                   "cpus": os.cpu_count(), "note": "machine shared with other jobs; min of 5 interleaved rounds",
                   "model": {"layers": config.num_layers, "d_model": config.d_model, "heads": config.num_heads},
                   "rows": rows}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
