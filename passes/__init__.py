"""torch.fx graph passes of the fastcache backend; each is a function GraphModule -> GraphModule."""

from .find_blocks import BlockPlanError, find_blocks
from .insert_cache import insert_cache, insert_recording
from .outline_blocks import outline_blocks
from .specialize import specialize_symints

__all__ = [
    "BlockPlanError",
    "find_blocks",
    "insert_cache",
    "insert_recording",
    "outline_blocks",
    "specialize_symints",
]
