"""Depth reduction: ``drop_blocks`` and ``replace_blocks`` (``depth``), ReplaceMe's linear map for a span
(``block_map``), and cutting a span out of the model with its config in step (``edit``)."""

from .depth import DropBlocks, ReplaceBlocks

__all__ = ["DropBlocks", "ReplaceBlocks"]
