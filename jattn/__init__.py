"""jattn: exact, memory-aware attention for JAX."""

from jattn import flex
from jattn.core import masks
from jattn.core.attention import attention
from jattn.parallel.context_parallel import context_parallel_decode
from jattn.kernels.decode import decode_attention
from jattn.dispatch import explain_implementation
from jattn.flax_attention_fn import flax_attention_fn, sequence_parallel_attention_fn
from jattn.flex import BlockMask, create_block_mask, flex_attention
from jattn.functional import dot_product_attention
from jattn.parallel.ring import ring_attention
from jattn.parallel.sequence_parallel import explain_sequence_parallel, sequence_parallel_attention
from jattn.parallel.ulysses import ulysses_attention
from jattn.rope import apply_rope

__all__ = [
    "BlockMask",
    "apply_rope",
    "attention",
    "context_parallel_decode",
    "create_block_mask",
    "decode_attention",
    "dot_product_attention",
    "explain_implementation",
    "explain_sequence_parallel",
    "flax_attention_fn",
    "flex",
    "flex_attention",
    "masks",
    "ring_attention",
    "sequence_parallel_attention",
    "sequence_parallel_attention_fn",
    "ulysses_attention",
]
__version__ = "0.1.0"

def __getattr__(name: str):
    """``jattn.nnx`` / ``jattn.linen`` (Flax) are imported on first use."""
    if name in ("nnx", "linen"):
        import importlib

        return importlib.import_module(f"jattn.{name}")
    raise AttributeError(f"module 'jattn' has no attribute {name!r}")
