"""jattn: exact, memory-aware attention for JAX."""

from jattn import masks
from jattn.attention import attention
from jattn.multihead import dot_product_attention

__all__ = ["attention", "dot_product_attention", "masks"]
__version__ = "0.1.0"
