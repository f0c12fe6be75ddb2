"""A small decoder-only Transformer for the copy task, built on jattn's attention module.

Shape glossary: B batch, T sequence length, D d_model, V vocabulary, F MLP width.

Why decoder-only with a separator rather than encoder-decoder: the example
``[BOS, x, SEP, y]`` is one causal sequence, so a single stack of causal self-attention
blocks does both the reading and the writing; there is one attention kind to check
gradients through, one KV cache covers prompt and generation, and the model has half the
modules of an encoder-decoder, so it compiles and trains faster on a CPU. Copying then
means: at the position of ``y_j`` attend to ``x_j`` (a constant offset, L+1 tokens back),
which the heads learn from the sinusoidal positions added to the token embeddings.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.flax_attention_fn import flax_attention_fn
from jattn.nnx import MultiHeadAttention


def sinusoidal_positions(positions: jax.Array, d_model: int) -> jax.Array:
    """Positions ``[*, T]`` (int) -> ``[*, T, D]`` with sin on even and cos on odd features."""
    freqs = 10000.0 ** (-jnp.arange(0, d_model, 2, dtype=jnp.float32) / d_model)  # [D/2]
    angles = positions[..., None].astype(jnp.float32) * freqs  # [*, T, D/2]
    pairs = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [*, T, D/2, 2]
    return pairs.reshape(*angles.shape[:-1], d_model)  # [*, T, D]


class Block(nnx.Module):
    """Pre-LayerNorm block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, num_heads: int, mlp_dim: int, *, implementation: str | None,
                 attention_fn, rngs: nnx.Rngs):
        self.attn_norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.attn = MultiHeadAttention(num_heads=num_heads, in_features=d_model, decode=False,
                                       implementation=implementation, attention_fn=attention_fn,
                                       rngs=rngs)
        self.mlp_norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.mlp_in = nnx.Linear(d_model, mlp_dim, rngs=rngs)
        self.mlp_out = nnx.Linear(mlp_dim, d_model, rngs=rngs)

    def __call__(self, x: jax.Array, *, decode: bool, sow_weights: bool) -> jax.Array:
        # x: [B, T, D]; in decode mode the T new tokens are appended to the module's KV cache
        # and is_causal lines the causal mask up with their cache positions.
        x = x + self.attn(self.attn_norm(x), decode=decode, is_causal=True, sow_weights=sow_weights)
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))


class Transformer(nnx.Module):
    def __init__(self, *, vocab_size: int, num_layers: int, d_model: int, num_heads: int,
                 mlp_dim: int, implementation: str | None = None, attention_fn=flax_attention_fn,
                 rngs: nnx.Rngs):
        self.d_model = d_model
        self.embed = nnx.Embed(vocab_size, d_model, rngs=rngs)
        self.blocks = nnx.List([
            Block(d_model, num_heads, mlp_dim, implementation=implementation,
                  attention_fn=attention_fn, rngs=rngs)
            for _ in range(num_layers)
        ])
        self.final_norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.output = nnx.Linear(d_model, vocab_size, rngs=rngs)

    def __call__(self, tokens: jax.Array, positions: jax.Array, *, decode: bool = False,
                 sow_weights: bool = False) -> jax.Array:
        """``tokens [B, T]`` at ``positions [B, T]`` -> logits ``[B, T, V]``."""
        x = self.embed(tokens) + sinusoidal_positions(positions, self.d_model)  # [B, T, D]
        for block in self.blocks:
            x = block(x, decode=decode, sow_weights=sow_weights)
        return self.output(self.final_norm(x))  # [B, T, V]

    def init_cache(self, batch_size: int, max_length: int) -> None:
        """Give every attention layer an empty KV cache for ``max_length`` positions."""
        for block in self.blocks:
            block.attn.init_cache((batch_size, max_length, self.d_model))


def create_model(config, rngs: nnx.Rngs, attention_fn=flax_attention_fn) -> Transformer:
    """The config's Transformer; ``attention_fn`` as in ``jattn.nnx.MultiHeadAttention``."""
    return Transformer(vocab_size=config.vocab_size, num_layers=config.num_layers,
                       d_model=config.d_model, num_heads=config.num_heads,
                       mlp_dim=config.mlp_dim, implementation=config.attention_implementation,
                       attention_fn=attention_fn, rngs=rngs)
