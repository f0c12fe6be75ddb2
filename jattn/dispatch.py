"""Which implementation runs a call, and why.

``implementation=None`` picks for you; a named implementation runs as asked or raises a
``ValueError`` saying why it cannot.
"""

from __future__ import annotations

from jattn.attention import attention_head
from jattn.multihead import Arrays, Config, register_implementation


def _xla_head(q, k, v, mask, bias, keep, structure, *, scale, logits_soft_cap, block_sizes):
    del block_sizes  # the reference materialises the whole [T, S] tile
    res = attention_head(q, k, v, mask, bias, keep, structure, scale, logits_soft_cap)
    return res.out, res.weights, res.logsumexp


register_implementation("xla", _xla_head)

IMPLEMENTATIONS = ("xla",)


def resolve(implementation: str | None, config: Config, arrays: Arrays, *, return_weights: bool) -> str:
    """The implementation that will run (a name in ``IMPLEMENTATIONS``)."""
    if implementation is None:
        return "xla"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation: expected None or one of {IMPLEMENTATIONS}, got {implementation!r}")
    return implementation
