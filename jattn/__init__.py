"""jattn: exact, memory-aware attention for JAX."""

import importlib as _importlib
import sys as _sys

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

# The files live by layer (core/, kernels/, parallel/; see the README's map); the module
# paths users, docs and tests know (``jattn.masks``, ``jattn.ring``, ``jattn.paged``, ...)
# stay importable: each is the layer's module under its old name.
_MOVED = {
    "attention": "jattn.core.attention",
    "masks": "jattn.core.masks",
    "_checks": "jattn.core._checks",
    "_finite": "jattn.core._finite",
    "spec": "jattn.core.spec",
    "blockwise": "jattn.kernels.blockwise",
    "chunked": "jattn.kernels.chunked",
    "decode": "jattn.kernels.decode",
    "paged": "jattn.kernels.paged",
    "_score_tiles": "jattn.kernels._score_tiles",
    "ring": "jattn.parallel.ring",
    "ulysses": "jattn.parallel.ulysses",
    "sequence_parallel": "jattn.parallel.sequence_parallel",
    "context_parallel": "jattn.parallel.context_parallel",
}
for _name, _path in _MOVED.items():
    _module = _importlib.import_module(_path)
    _sys.modules.setdefault(f"jattn.{_name}", _module)
    globals().setdefault(_name, _module)  # jattn.attention stays the function
del _name, _path, _module


def __getattr__(name: str):
    """``jattn.nnx`` / ``jattn.linen`` (Flax) are imported on first use."""
    if name in ("nnx", "linen"):
        import importlib

        return importlib.import_module(f"jattn.{name}")
    raise AttributeError(f"module 'jattn' has no attribute {name!r}")
