"""Continuous batching with a paged KV cache, checked against generating each sequence alone.

Shape glossary: B batch slots, T tokens per engine step (T_pad while a slot is prefilling,
else 1), D model width, N heads, Hd head dim, V vocabulary.

A tiny decoder-only model built from ``jattn.nnx.MultiHeadAttention`` (random weights, RoPE)
serves a queue of requests with different prompt lengths and generation budgets through a
fixed number of batch slots, the way serving systems do: a slot that finishes is freed (its
pages go back to the pool) and the next request takes it while the other slots keep decoding.
Each engine step runs every slot at once: a newly admitted request prefills its whole prompt
(left-padded to T_pad, so its last token sits last), the others feed their one new token.
Attention reads the pages in place (``jattn.kernels.paged``).

The reference generates each request alone, with the module's own fixed-size KV cache
(``decode=True``); the tokens must be the same, one for one.

    python examples/continuous_batching.py
"""

from __future__ import annotations

import functools
from collections import deque

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jattn
from jattn.kernels import paged
from jattn.nnx import MultiHeadAttention


class Block(nnx.Module):
    def __init__(self, d: int, heads: int, kv_heads: int, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = MultiHeadAttention(heads, d, num_kv_heads=kv_heads, rope_base=10_000.0,
                                       decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, 4 * d, rngs=rngs)
        self.down = nnx.Linear(4 * d, d, rngs=rngs)

    def mlp(self, x):
        return self.down(jax.nn.gelu(self.up(self.norm2(x))))


class TinyLM(nnx.Module):
    def __init__(self, vocab: int = 48, d: int = 32, heads: int = 4, kv_heads: int = 2,
                 layers: int = 2, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.blocks = nnx.List([Block(d, heads, kv_heads, rngs) for _ in range(layers)])

    def __call__(self, tokens):
        """The module's own decode path: tokens [1, T] appended to each layer's fixed cache."""
        x = self.embed(tokens)  # [1, T, D]
        for block in self.blocks:
            x = x + block.attn(block.norm1(x), decode=True, is_causal=True)
            x = x + block.mlp(x)
        return self.embed.attend(x)  # [1, T, V]


@nnx.jit
def _forward(model: TinyLM, tokens):
    return model(tokens)  # [1, T, V]; the caches are updated in place


def generate_alone(model: TinyLM, prompt: list[int], num_new: int, capacity: int | None = None) -> list[int]:
    """Greedy decoding of one request with the modules' fixed-size caches.

    ``capacity``: cache positions (default ``len(prompt) + num_new``); one capacity for all
    requests lets them share the compiled steps.
    """
    capacity = len(prompt) + num_new if capacity is None else capacity
    for block in model.blocks:
        block.attn.init_cache((1, capacity, model.embed.features))
    logits = _forward(model, jnp.asarray([prompt]))
    out = [int(jnp.argmax(logits[0, -1]))]
    while len(out) < num_new:
        logits = _forward(model, jnp.asarray([[out[-1]]]))
        out.append(int(jnp.argmax(logits[0, -1])))
    return out


def paged_forward(model: TinyLM, caches, tokens, num_new):
    """One engine step: tokens [B, T] left-padded (row b's last num_new[b] are real).

    Each layer projects with the module's own parameters, rotates at the cache positions,
    appends the real tokens' keys/values to its paged cache and attends over the pages.
    Returns (logits of each row's last token [B, V], updated caches).
    """
    B, T = tokens.shape
    x = model.embed(tokens)  # [B, T, D]
    shift = T - num_new  # [B] pad tokens in front
    new_caches = []
    for block, cache in zip(model.blocks, caches):
        attn = block.attn
        h = block.norm1(x)
        q, k, v = attn.query(h), attn.key(h), attn.value(h)  # [B, T, N|K, Hd]
        pos = cache.lengths[:, None] + jnp.arange(T)[None, :] - shift[:, None]  # [B, T]
        q = jattn.apply_rope(q, pos, attn.rope_base)
        k = jattn.apply_rope(k, pos, attn.rope_base)
        # The real tokens first (append takes right-padded chunks).
        idx = (jnp.arange(T)[None, :] + shift[:, None]) % T  # [B, T]
        k = jnp.take_along_axis(k, idx[:, :, None, None], axis=1)
        v = jnp.take_along_axis(v, idx[:, :, None, None], axis=1)
        cache = paged.append(paged.allocate(cache, num_new), k, v, num_new)
        o = paged.paged_decode_attention(q, cache)  # [B, T, N, Hd]
        x = x + attn.out(o)
        x = x + block.mlp(x)
        new_caches.append(cache)
    return model.embed.attend(x[:, -1]), new_caches  # [B, V]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _step(graphdef, state, caches, tokens, num_new):
    model = nnx.merge(graphdef, state)
    logits, caches = paged_forward(model, caches, tokens, num_new)
    return jnp.argmax(logits, axis=-1), caches  # [B]


def serve(model: TinyLM, requests: list[tuple[list[int], int]], *, slots: int = 3,
          page_size: int = 4, num_pages: int = 64, max_pages: int = 8, prefill_pad: int = 8):
    """Continuous batching of ``requests`` = [(prompt, num_new)] through ``slots`` batch rows.

    Returns (generated tokens per request in request order, engine steps, step log).
    """
    attn = model.blocks[0].attn
    caches = [paged.init(num_pages, page_size, attn.num_kv_heads, attn.head_dim, batch_size=slots,
                         max_pages_per_sequence=max_pages) for _ in model.blocks]
    graphdef, state = nnx.split(model)
    queue = deque(enumerate(requests))
    running: dict[int, tuple[int, int]] = {}  # slot -> (request id, tokens still to generate)
    outputs: dict[int, list[int]] = {}
    last = np.zeros(slots, np.int32)
    steps, log = 0, []
    while queue or running:
        admitted = []
        for slot in range(slots):
            if slot not in running and queue:
                rid, (prompt, n) = queue.popleft()
                if len(prompt) > prefill_pad:
                    raise ValueError(f"requests: prompt {rid} longer than prefill_pad={prefill_pad}")
                running[slot] = (rid, n)
                outputs[rid] = []
                admitted.append((slot, prompt))
        T = prefill_pad if admitted else 1
        tokens = np.zeros((slots, T), np.int32)
        num_new = np.zeros(slots, np.int32)
        for slot in running:
            tokens[slot, -1], num_new[slot] = last[slot], 1
        for slot, prompt in admitted:
            tokens[slot, T - len(prompt):], num_new[slot] = prompt, len(prompt)
        nxt, caches = _step(graphdef, state, caches, jnp.asarray(tokens), jnp.asarray(num_new))
        nxt = np.asarray(nxt)
        steps += 1
        done = np.zeros(slots, bool)
        for slot, (rid, left) in list(running.items()):
            outputs[rid].append(int(nxt[slot]))
            last[slot] = nxt[slot]
            if left == 1:
                del running[slot]
                done[slot] = True
            else:
                running[slot] = (rid, left - 1)
        log.append({"T": T, "active": int(num_new.astype(bool).sum()), "finished": int(done.sum())})
        if done.any():
            caches = [paged.free(c, done) for c in caches]
    for c in caches:
        paged.check(c)
    return [outputs[i] for i in range(len(requests))], steps, log


def demo_requests(seed: int = 0, count: int = 7, vocab: int = 48):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, vocab, size=int(rng.integers(2, 9))).tolist(), int(rng.integers(2, 9)))
            for _ in range(count)]


def main():
    model = TinyLM(rngs=nnx.Rngs(0))
    requests = demo_requests()
    batched, steps, log = serve(model, requests)
    capacity = max(len(prompt) + n for prompt, n in requests)
    alone = [generate_alone(model, prompt, n, capacity) for prompt, n in requests]
    for i, ((prompt, n), got, want) in enumerate(zip(requests, batched, alone)):
        print(f"request {i}: prompt {len(prompt)} tokens, {n} new: {got}  {'==' if got == want else '!='} alone")
    tokens = sum(n for _, n in requests)
    print(f"{len(requests)} requests, {tokens} generated tokens in {steps} engine steps over 3 slots "
          f"(one at a time: {tokens} steps)")
    if batched != alone:
        raise SystemExit("continuous batching differs from generating each request alone")
    print("continuous batching == one-at-a-time generation, token for token")


if __name__ == "__main__":
    main()
