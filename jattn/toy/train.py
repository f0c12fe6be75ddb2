"""Training state, the jitted train/eval steps and greedy decoding with the KV cache.

Shape glossary: B batch, T = 2L+1 model input length, L source length, P = L+2 prompt
length, V vocabulary, N heads, Q devices on the 'sequence' mesh axis, Tq = T padded to a
multiple of 2Q.

Everything here is a pure function of its arguments: the model's structure (``graphdef``)
and the optimizer are bound in by ``jit_steps``; the state (step, parameters, optimizer
state) is an explicit pytree, donated to ``train_step``.

Sequence parallelism (``config.mesh.sequence = Q > 1``) changes the training step only.
Each training batch is padded at the end to Tq positions (PAD tokens with zero loss weight:
under the causal mask no real position sees them) and permuted into ring attention's
zig-zag layout (``jattn.parallel.ring.to_layout``), then split ``[B, Tq]`` over ('data', 'sequence').
The model keeps that order; its sinusoidal positions are ``layout_positions`` (the original
index of each row) and its attention is ``jattn.sequence_parallel_attention_fn``. The loss
is a weighted sum over positions, so the order does not change it. Evaluation, greedy
decoding (KV cache) and attention maps use the same parameters in a model with the default
attention (the graphdefs differ only in ``attention_fn``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jattn.parallel.ring import layout_positions, to_layout
from jattn.flax_attention_fn import sequence_parallel_attention_fn
from jattn.toy import data, mesh as mesh_lib
from jattn.toy.model import create_model

# Gradient-norm names recorded at every log step: per layer the attention projections,
# plus the token embedding and the output layer.
PROJECTIONS = {"W_Q": "query", "W_K": "key", "W_V": "value", "W_O": "out"}


class TrainState(NamedTuple):
    step: jax.Array  # [] int32: optimizer steps taken
    params: nnx.State  # the model's nnx.Param variables
    opt_state: Any  # optax state of make_optimizer


def make_schedule(config) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate``, then cosine decay to 0."""
    return optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, config.warmup_steps, config.num_train_steps, end_value=0.0
    )


def make_optimizer(config) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip_norm),
        optax.adamw(make_schedule(config), b2=0.98, weight_decay=config.weight_decay),
    )


def create_train_state(config, mesh) -> tuple[nnx.GraphDef, TrainState]:
    """The model structure and an initial state, replicated over ``mesh``."""
    tx = make_optimizer(config)

    def init() -> TrainState:
        params = nnx.state(create_model(config, nnx.Rngs(params=config.seed)), nnx.Param)
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

    state = jax.jit(init, out_shardings=mesh_lib.replicated(mesh))()
    return model_graphdef(config), state


def model_graphdef(config, attention_fn=None) -> nnx.GraphDef:
    """The model's structure; ``attention_fn`` None = the default (``jattn.flax_attention_fn``)."""
    kwargs = {} if attention_fn is None else {"attention_fn": attention_fn}
    return nnx.graphdef(nnx.eval_shape(lambda: create_model(config, nnx.Rngs(params=0), **kwargs)))


def to_sequence_layout(batch: data.Batch, num_devices: int) -> data.Batch:
    """Pad ``[B, T]`` to ``[B, Tq]`` (PAD, weight 0) and permute into the zig-zag layout."""
    if num_devices == 1:
        return batch
    pad = -batch.inputs.shape[1] % (2 * num_devices)
    padded = (jnp.pad(x, ((0, 0), (0, pad))) for x in batch)  # [B, Tq] each; PAD = 0, weight 0
    return data.Batch(*(to_layout(x, num_devices, "zigzag") for x in padded))


def _positions(tokens: jax.Array, num_devices: int = 1) -> jax.Array:
    """Original position of each row of ``tokens [B, T]`` (stored in zig-zag if ``num_devices > 1``)."""
    T = tokens.shape[1]
    order = jnp.arange(T) if num_devices == 1 else layout_positions(T, num_devices, "zigzag")  # [T]
    return jnp.broadcast_to(order, tokens.shape)  # [B, T]


def _loss_and_metrics(params, batch: data.Batch, graphdef, sequence_devices: int = 1):
    model = nnx.merge(graphdef, params)
    logits = model(batch.inputs, _positions(batch.inputs, sequence_devices))  # [B, T, V]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch.targets)  # [B, T]
    count = jnp.sum(batch.weights)
    loss = jnp.sum(ce * batch.weights) / count
    correct = (jnp.argmax(logits, -1) == batch.targets).astype(jnp.float32)  # [B, T]
    token_accuracy = jnp.sum(correct * batch.weights) / count
    return loss, token_accuracy


def gradient_norms(grads: nnx.State) -> dict[str, jax.Array]:
    """L2 norms of the W_Q/W_K/W_V/W_O kernels of each layer, the embedding and the output."""
    g = nnx.to_pure_dict(grads)
    norms = {"embed": optax.tree.norm(g["embed"]), "output": optax.tree.norm(g["output"])}
    for i in sorted(g["blocks"]):
        attn = g["blocks"][i]["attn"]
        for name, module in PROJECTIONS.items():
            norms[f"layer{i}/{name}"] = jnp.linalg.norm(attn[module]["kernel"])
    return norms


def all_finite(tree) -> jax.Array:
    """[] bool: True iff every element of every leaf of ``tree`` is finite."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def train_step(state: TrainState, batch: data.Batch, *, graphdef, tx, schedule, sequence_devices: int):
    """One AdamW step on ``batch`` (in ``to_sequence_layout``). Returns the new state and metrics.

    ``metrics["all_finite"]`` ([] bool) is False when the loss, a gradient or the new state
    holds a NaN or an infinity; the training loop checks it before logging or saving.
    """
    grad_fn = jax.value_and_grad(_loss_and_metrics, has_aux=True)
    (loss, token_accuracy), grads = grad_fn(state.params, batch, graphdef, sequence_devices)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "all_finite": all_finite((loss, grads, params, opt_state)),
        "loss": loss,
        "token_accuracy": token_accuracy,
        "learning_rate": schedule(state.step),
        "grad_norm/global": optax.tree.norm(grads),
        **{f"grad_norm/{k}": v for k, v in gradient_norms(grads).items()},
    }
    return TrainState(state.step + 1, params, opt_state), metrics


def decode(params, prompt: jax.Array, *, graphdef, num_new: int) -> jax.Array:
    """Greedy decoding with the KV cache: ``prompt [B, P]`` -> ``num_new`` tokens [B, num_new].

    The whole prompt goes through the model in one call (filling the cache, causally), then
    each step feeds only the previous step's argmax and attends to the cache.
    """
    B, P = prompt.shape
    model = nnx.merge(graphdef, params)
    model.init_cache(B, P + num_new - 1)  # every token but the last generated one is fed
    logits = model(prompt, _positions(prompt), decode=True)  # [B, P, V]
    first = jnp.argmax(logits[:, -1], -1).astype(prompt.dtype)  # [B]
    cache_graphdef, params, cache = nnx.split(model, nnx.Param, nnx.Cache)

    def step(carry, position):
        cache, token = carry  # token [B]: the last generated token, at ``position``
        model = nnx.merge(cache_graphdef, params, cache)
        logits = model(token[:, None], jnp.full((B, 1), position), decode=True)  # [B, 1, V]
        token = jnp.argmax(logits[:, 0], -1).astype(prompt.dtype)  # [B]
        return (nnx.state(model, nnx.Cache), token), token

    _, rest = jax.lax.scan(step, (cache, first), jnp.arange(P, P + num_new - 1))  # rest [num_new-1, B]
    return jnp.concatenate([first[:, None], rest.T], axis=1)  # [B, num_new]


def eval_step(params, batch: data.Batch, *, graphdef, seq_len: int):
    """Held-out metrics: teacher-forced loss, and greedy-decoding token/sequence accuracy."""
    loss, _ = _loss_and_metrics(params, batch, graphdef)
    outputs = decode(params, data.prompts(batch, seq_len), graphdef=graphdef, num_new=seq_len)  # [B, L]
    correct = outputs == data.expected_outputs(batch, seq_len)  # [B, L]
    metrics = {
        "eval_loss": loss,
        "token_accuracy": jnp.mean(correct.astype(jnp.float32)),
        "seq_accuracy": jnp.mean(jnp.all(correct, axis=1).astype(jnp.float32)),
    }
    return metrics, outputs


def attention_maps(params, inputs: jax.Array, *, graphdef) -> jax.Array:
    """Attention weights of every layer for ``inputs [B, T]``: [layers, B, N, T, T]."""
    forward = nnx.capture(nnx.merge(graphdef, params), nnx.Intermediate)
    _, sown = forward(inputs, _positions(inputs), sow_weights=True)
    sown = nnx.to_pure_dict(sown)
    per_layer = [sown["blocks"][i]["attn"]["attention_weights"][0] for i in sorted(sown["blocks"])]  # [B, N, T, T] each
    return jnp.stack(per_layer)  # [layers, B, N, T, T]


class Steps(NamedTuple):
    """The jitted functions of one model/optimizer; see the functions of the same names."""

    train_step: Callable  # (state, batch) -> (state, metrics incl. "all_finite"); state donated
    eval_step: Callable  # (params, batch) -> (metrics, outputs [B, L])
    attention_maps: Callable  # (params, inputs [B, T]) -> [layers, B, N, T, T]
    train_batch: Callable  # (step) -> Batch [B, Tq] in to_sequence_layout, over ('data', 'sequence')


def jit_steps(config, graphdef, mesh) -> Steps:
    rep, tokens = mesh_lib.replicated(mesh), mesh_lib.tokens_sharded(mesh)
    Q = mesh.shape["sequence"]
    train_graphdef = graphdef if Q == 1 else model_graphdef(config, sequence_parallel_attention_fn(
        mesh=mesh, axis_name="sequence", batch_axis="data", layout="zigzag"))
    train = functools.partial(train_step, graphdef=train_graphdef, tx=make_optimizer(config),
                              schedule=make_schedule(config), sequence_devices=Q)
    make = functools.partial(data.train_batch, config.seed, batch_size=config.batch_size,
                             seq_len=config.seq_len, vocab_size=config.vocab_size, task=config.task)

    def batch_fn(step):
        return to_sequence_layout(make(step), Q)

    return Steps(
        train_step=jax.jit(train, donate_argnums=0, out_shardings=(rep, rep)),
        eval_step=jax.jit(functools.partial(eval_step, graphdef=graphdef, seq_len=config.seq_len),
                          out_shardings=(rep, rep)),
        attention_maps=jax.jit(functools.partial(attention_maps, graphdef=graphdef)),
        train_batch=jax.jit(batch_fn, out_shardings=tokens),
    )
