"""Copy/reverse task data, generated deterministically from (seed, step).

Shape glossary: B batch, L source length (``seq_len``), T = 2L+1 model input length.

An example is the token sequence ``[BOS, x_1..x_L, SEP, y_1..y_L]`` with ``y = x`` (copy) or
``y = reversed(x)`` (reverse). The model reads it shifted by one and is scored only on the
``y`` positions. Symbols are token ids ``NUM_SPECIAL..vocab_size-1``.

Held-out split: a source ``x`` (symbols ``0..M-1``) is held out iff its checksum
``(x_L + sum_{i=1}^{L-1} i·x_i) mod M`` is 0, i.e. exactly 1/M of all sources. Training
sources are drawn uniformly from the others (the last symbol is drawn among the M-1 values
that avoid checksum 0), held-out ones uniformly from that set (the last symbol is solved for),
so no held-out sequence is ever trained on.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

PAD, BOS, SEP = 0, 1, 2
NUM_SPECIAL = 3
_TRAIN_STREAM, _EVAL_STREAM = 0, 1


class Batch(NamedTuple):
    inputs: jax.Array  # [B, T] int32: [BOS, x, SEP, y_1..y_{L-1}]
    targets: jax.Array  # [B, T] int32: inputs shifted left by one
    weights: jax.Array  # [B, T] float32: 1 on the y positions, else 0


def partial_checksum(body: jax.Array, num_symbols: int) -> jax.Array:
    """Checksum of a source's first L-1 symbols ``body [B, L-1]`` -> [B]."""
    w = jnp.arange(1, body.shape[-1] + 1, dtype=jnp.int32)  # [L-1]
    return jnp.sum(body * w, axis=-1) % num_symbols  # [B]


def is_heldout(sources: jax.Array, num_symbols: int) -> jax.Array:
    """``sources [B, L]`` (symbols 0..M-1) -> bool [B]: True for the evaluation set."""
    return (partial_checksum(sources[:, :-1], num_symbols) + sources[:, -1]) % num_symbols == 0


def _sources(key, batch_size: int, seq_len: int, num_symbols: int, heldout: bool) -> jax.Array:
    k_body, k_last = jax.random.split(key)
    body = jax.random.randint(k_body, (batch_size, seq_len - 1), 0, num_symbols, jnp.int32)  # [B, L-1]
    forbidden = (-partial_checksum(body, num_symbols)) % num_symbols  # [B]: last symbol giving checksum 0
    if heldout:
        last = forbidden
    else:
        draw = jax.random.randint(k_last, (batch_size,), 0, num_symbols - 1, jnp.int32)  # [B]
        last = draw + (draw >= forbidden)
    return jnp.concatenate([body, last[:, None]], axis=1)  # [B, L]


def _targets(sources: jax.Array, task: str) -> jax.Array:
    return sources if task == "copy" else sources[:, ::-1]


def make_batch(sources: jax.Array, task: str) -> Batch:
    """Sources ``[B, L]`` (symbols 0..M-1) -> a teacher-forcing batch over ``T = 2L+1``."""
    B, L = sources.shape
    x = sources + NUM_SPECIAL
    y = _targets(sources, task) + NUM_SPECIAL
    tokens = jnp.concatenate(
        [jnp.full((B, 1), BOS, jnp.int32), x, jnp.full((B, 1), SEP, jnp.int32), y], axis=1
    )  # [B, 2L+2]
    weights = (jnp.arange(2 * L + 1) >= L + 1).astype(jnp.float32)  # [T]
    return Batch(tokens[:, :-1], tokens[:, 1:], jnp.broadcast_to(weights, (B, 2 * L + 1)))


def prompts(batch: Batch, seq_len: int) -> jax.Array:
    """The decoding prompt ``[BOS, x, SEP]`` of each example: [B, L+2]."""
    return batch.inputs[:, : seq_len + 2]  # [B, L+2]


def expected_outputs(batch: Batch, seq_len: int) -> jax.Array:
    """The tokens greedy decoding must produce: ``y`` as token ids, [B, L]."""
    return batch.targets[:, seq_len + 1 :]  # [B, L]


def train_batch(seed: int, step, *, batch_size: int, seq_len: int, vocab_size: int, task: str) -> Batch:
    """The training batch of ``step``: a pure function of (seed, step); jit-friendly."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _TRAIN_STREAM), step)
    return make_batch(_sources(key, batch_size, seq_len, vocab_size - NUM_SPECIAL, False), task)


def eval_batch(seed: int, *, num_sequences: int, seq_len: int, vocab_size: int, task: str) -> Batch:
    """The fixed held-out set: ``num_sequences`` sources with checksum 0."""
    key = jax.random.fold_in(jax.random.key(seed), _EVAL_STREAM)
    return make_batch(_sources(key, num_sequences, seq_len, vocab_size - NUM_SPECIAL, True), task)


def symbols_text(tokens) -> str:
    """Token ids -> a readable string, e.g. ``'<s> 3 1 4 | 3 1 4'``."""
    names = {PAD: "_", BOS: "<s>", SEP: "|"}
    return " ".join(names.get(int(t), str(int(t) - NUM_SPECIAL)) for t in tokens)
