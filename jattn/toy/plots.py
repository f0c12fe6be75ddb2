"""attention.png and grad_flow.png (matplotlib, Agg backend: no display needed).

Shape glossary: Ly layers, N heads, T sequence length.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402

from jattn.toy.train import PROJECTIONS  # noqa: E402


def plot_attention(weights: np.ndarray, labels: list[str], path: str, title: str) -> None:
    """Grid of attention maps ``weights [Ly, N, T, T]``; rows are queries, columns keys."""
    num_layers, num_heads, T, _ = weights.shape
    size = 0.22 * T + 1.0
    fig, axes = plt.subplots(num_layers, num_heads, figsize=(size * num_heads, size * num_layers),
                             squeeze=False)
    for layer in range(num_layers):
        for head in range(num_heads):
            ax = axes[layer, head]
            ax.imshow(weights[layer, head], cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_title(f"layer {layer}, head {head}", fontsize=8)
            ax.set_xticks(range(T), labels, fontsize=6, rotation=90)
            ax.set_yticks(range(T), labels, fontsize=6)
            ax.set_xlabel("key", fontsize=7)
            ax.set_ylabel("query", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_grad_flow(rows: list[dict], num_layers: int, path: str) -> None:
    """Loss, then per layer the W_Q/W_K/W_V/W_O gradient norms, then embedding/output norms."""
    steps = [r["step"] for r in rows]
    panels = 2 + num_layers
    fig, axes = plt.subplots(1, panels, figsize=(3.6 * panels, 3.2), squeeze=False)
    axes = axes[0]
    axes[0].semilogy(steps, [r["loss"] for r in rows], color="black")
    axes[0].set_title("training loss")
    for layer in range(num_layers):
        ax = axes[1 + layer]
        for name in PROJECTIONS:
            ax.semilogy(steps, [r[f"grad_norm/layer{layer}/{name}"] for r in rows], label=name)
        ax.set_title(f"layer {layer}: attention gradient norms")
        ax.legend(fontsize=7)
    ax = axes[-1]
    for name in ("embed", "output"):
        ax.semilogy(steps, [r[f"grad_norm/{name}"] for r in rows], label=name)
    ax.set_title("embedding / output gradient norms")
    ax.legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
