"""The seed's NumPy walkthrough, step by step in JAX with jattn: ``python -m jattn.walkthrough``.

Three tokens X [3, d_model=4] are projected to queries, keys and values, scored, scaled,
softmax-normalised and mixed; then the same for two heads with ``jattn.dot_product_attention``.
Every step is printed and checked against the seed's plain NumPy computation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jattn

D_MODEL, D_K, D_V, NUM_HEADS = 4, 2, 2, 2
X = np.array([[1, 0, 1, 0], [0, 1, 0, 1], [1, 1, 1, 1]], dtype=np.float32)  # [T=3, d_model]


def seed_numpy(X, W_Q, W_K, W_V):
    """The seed's computation, verbatim in spirit: NumPy, one head."""
    Q, K, V = X @ W_Q, X @ W_K, X @ W_V
    scores = Q @ K.T / np.sqrt(W_K.shape[1])
    weights = np.exp(scores) / np.sum(np.exp(scores), axis=1, keepdims=True)
    return Q, K, V, scores, weights, weights @ V


def one_head(X, W_Q, W_K, W_V, show=print):
    """Each step of softmax(Q Kᵀ / √d_k) V in JAX, then jattn.attention for the whole thing."""
    Q = X @ W_Q  # [T, d_k]
    K = X @ W_K  # [T, d_k]
    V = X @ W_V  # [T, d_v]
    scores = Q @ K.T / jnp.sqrt(D_K)  # [T, T]
    weights = jax.nn.softmax(scores, axis=-1)  # [T, T], rows sum to 1
    output = weights @ V  # [T, d_v]
    for name, value in (("Queries Q = X W_Q", Q), ("Keys K = X W_K", K), ("Values V = X W_V", V),
                        ("Scores Q Kᵀ / √d_k", scores), ("Attention weights softmax(scores)", weights),
                        ("Output weights V", output)):
        show(f"{name}:\n{np.asarray(value).round(4)}\n")
    out, w = jattn.attention(Q, K, V, return_weights=True)  # the same, in one call
    return dict(Q=Q, K=K, V=V, scores=scores, weights=weights, output=output, jattn_out=out, jattn_weights=w)


def multi_head(X, W_Q, W_K, W_V):
    """Two heads: per-head projections, jattn.dot_product_attention, concatenation."""
    Q = jnp.einsum("td,dnh->tnh", X, W_Q)  # [T, N, d_k]
    K = jnp.einsum("td,dnh->tnh", X, W_K)  # [T, N, d_k]
    V = jnp.einsum("td,dnh->tnh", X, W_V)  # [T, N, d_v]
    heads = jattn.dot_product_attention(Q, K, V)  # [T, N, d_v]
    return heads.reshape(X.shape[0], -1)  # [T, N * d_v]: the concatenated heads


def main(seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    W_Q, W_K, W_V = (rng.random((D_MODEL, d)).astype(np.float32) for d in (D_K, D_K, D_V))
    print("Input X (3 tokens, d_model = 4):\n", X, "\n")
    steps = one_head(jnp.asarray(X), W_Q, W_K, W_V)
    Q, K, V, scores, weights, output = seed_numpy(X, W_Q, W_K, W_V)
    reference = dict(Q=Q, K=K, V=V, scores=scores, weights=weights, output=output,
                     jattn_out=output, jattn_weights=weights)
    worst = max(float(np.max(np.abs(np.asarray(steps[k]) - reference[k]))) for k in reference)
    print(f"One head: largest difference from the seed's NumPy computation: {worst:.2e}")

    W_Qh, W_Kh, W_Vh = (rng.random((D_MODEL, NUM_HEADS, d)).astype(np.float32) for d in (D_K, D_K, D_V))
    concat = multi_head(jnp.asarray(X), W_Qh, W_Kh, W_Vh)
    per_head = [seed_numpy(X, W_Qh[:, n], W_Kh[:, n], W_Vh[:, n])[-1] for n in range(NUM_HEADS)]
    head_diff = float(np.max(np.abs(np.asarray(concat) - np.concatenate(per_head, axis=-1))))
    print(f"\nMulti-head output (concatenated {NUM_HEADS} heads):\n{np.asarray(concat).round(4)}")
    print(f"Multi-head: largest difference from per-head NumPy + concatenation: {head_diff:.2e}")
    worst = max(worst, head_diff)
    print("MATCH" if worst < 1e-5 else "MISMATCH")
    return worst


if __name__ == "__main__":
    raise SystemExit(0 if main() < 1e-5 else 1)
