"""Programmable attention: ``score_mod`` / ``mask_mod``, ``BlockMask`` and ``flex_attention``.

``jattn.flex.mods`` holds ready-made mods and combinators; the top-level ``jattn`` package
re-exports ``flex_attention``, ``create_block_mask`` and ``BlockMask``.
"""

from jattn.flex import mods
from jattn.flex.api import flex_attention
from jattn.flex.block_mask import BlockMask, create_block_mask

__all__ = ["BlockMask", "create_block_mask", "flex_attention", "mods"]
