"""jattn: exact, memory-aware attention for JAX."""

from jattn import masks
from jattn.attention import attention
from jattn.multihead import dot_product_attention
from jattn.ring import ring_attention
from jattn.sequence_parallel import sequence_parallel_attention

__all__ = ["attention", "dot_product_attention", "masks"]
__all__ += ["ring_attention", "sequence_parallel_attention"]
__version__ = "0.1.0"
